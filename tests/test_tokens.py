"""Tokens issued and revoked while the service runs: stored hashed in Redis beside the ledger,
in force on every server within a second, streams included.  Two real servers, real Redis."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import grpc
import pytest

from factpatch.auth import IssuedTokens, Token, TokenStore, UnknownTokenError, token_sha256
from factpatch.client import Client
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue
from factpatch.rpc import pb
from factpatch.server import build_server
from factpatch.store import connect

ADMIN = "boot-" + "k" * 30


def bootstrap() -> TokenStore:
    """The bootstrap token of each server (as FACTPATCH_ADMIN_TOKEN would give)."""
    return TokenStore([Token("ops", token_sha256(ADMIN), frozenset({"admin"}))])


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def until(predicate, timeout: float = 5.0) -> float:
    """Seconds until ``predicate()`` holds (AssertionError after ``timeout``)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def two_servers(tiny_llama, redis_url):
    name = f"tok-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    settings = Settings(ledger=name, port=0, http_port=0, poll_interval=0.2)
    servers = [
        build_server(handle, ledger, queue, settings, auth=bootstrap()).start()
        for handle in (tiny_llama, tiny_llama.clone())
    ]
    yield [f"127.0.0.1:{s.port}" for s in servers], ledger
    for s in servers:
        s.stop(grace=0.5)


def test_issued_tokens_are_stored_hashed_and_audited(ledger: Ledger):
    issued = IssuedTokens(ledger.redis, ledger.name)
    token = issued.add("alice", ["infer"], actor="ops")
    stored = b"".join(ledger.redis.hvals(issued.k_tokens))
    assert token.encode() not in stored and token_sha256(token).encode() in stored
    with pytest.raises(FileExistsError, match=r"^name: a token named 'alice' exists"):
        issued.add("alice", ["edit"], actor="ops")
    with pytest.raises(ValueError, match=r"^scopes:"):
        issued.add("bob", ["root"], actor="ops")
    with pytest.raises(ValueError, match=r"^name:"):
        issued.add("bad name", ["infer"], actor="ops")
    issued.refresh()
    assert [t.name for t in issued.current] == ["alice"]
    assert issued.revoke("alice", actor="ops")["scopes"] == ["infer"]
    with pytest.raises(UnknownTokenError):
        issued.revoke("alice", actor="ops")
    issued.refresh()
    assert issued.current == []
    audit = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in ledger.redis.xrange(issued.k_audit)
    ]
    assert [(a["action"], a["id"], a["actor"]) for a in audit] == [
        ("token-add", "alice", "ops"),
        ("token-revoke", "alice", "ops"),
    ]


def test_a_token_added_on_one_server_works_on_the_other_until_revoked(two_servers):
    (a, b), ledger = two_servers
    with Client(a, token=ADMIN) as admin_a:
        issued = admin_a.add_token("alice", ["infer"])
        assert issued.name == "alice" and list(issued.scopes) == ["infer"] and issued.token
        assert issued.actor == "ops"  # who issued it
        assert [t.name for t in admin_a.list_tokens()] == ["alice"]
        assert all(not t.token for t in admin_a.list_tokens())  # never shown again
        with Client(b, token=issued.token) as alice_b:
            until(lambda: code_of(alice_b.head) == grpc.StatusCode.OK)
            assert alice_b.score("Big Ben is in", " Rome").version == 0
            assert code_of(alice_b.rollback, 0) == grpc.StatusCode.PERMISSION_DENIED
            # A stream open on server B when server A revokes the token: its next message is
            # refused.  (WatchHead sends one message per version; a rollback makes one.)
            watch = alice_b.ledger.WatchHead(pb.WatchHeadRequest(), metadata=alice_b.metadata)
            assert next(watch).number == 0
            admin_a.revoke_token("alice")
            seconds = until(lambda: code_of(alice_b.head) == grpc.StatusCode.UNAUTHENTICATED)
            assert seconds < 5.0
            admin_a.rollback(0)  # version 1: the stream's next message
            with pytest.raises(grpc.RpcError) as info:
                next(watch)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in info.value.details()
        assert admin_a.list_tokens() == []
        # Revoking again, or a token that never existed: NOT_FOUND naming the field.
        assert code_of(admin_a.revoke_token, "alice") == grpc.StatusCode.NOT_FOUND
        assert code_of(admin_a.add_token, "x y", ["infer"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert ledger.head() == 1


def test_only_admins_manage_tokens_and_the_cli_does_it(two_servers, capsys):
    import json

    from factpatch.cli import main

    (a, _), _ = two_servers
    with Client(a, token=ADMIN) as admin:
        reader = admin.add_token("reader", ["infer"]).token
    with Client(a, token=reader) as c:
        until(lambda: code_of(c.head) == grpc.StatusCode.OK)
        assert code_of(c.list_tokens) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(c.add_token, "mine", ["admin"]) == grpc.StatusCode.PERMISSION_DENIED
    cli = ["tokens", "--target", a, "--token", ADMIN, "--json"]
    assert main([*cli, "add", "ci", "--scope", "edit"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["name"] == "ci" and added["scopes"] == ["edit"] and added["token"]
    assert main([*cli, "list"]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)] == ["reader", "ci"]
    assert main([*cli, "revoke", "ci"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "ci"


def test_an_http_stream_ends_at_its_next_chunk_once_its_token_is_revoked(tiny_llama, redis_url):
    name = f"tok-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    settings = Settings(ledger=name, port=0, http_port=0, poll_interval=0.2)
    server = build_server(tiny_llama, ledger, queue, settings, auth=bootstrap()).start()
    issued = IssuedTokens(ledger.redis, name)
    token = issued.add("alice", ["infer"], actor="ops")
    until(lambda: server.frontend.tokens.current != [])  # the server's refresh tick saw it
    # Each forward pass takes ≥ 50 ms, so the 48-token stream is still running when the token
    # goes (the server re-reads the issued tokens every 0.2 s).
    slow = tiny_llama.model.register_forward_hook(lambda *_: time.sleep(0.05))
    body = {"model": tiny_llama.name, "prompt": "Big Ben is in", "max_tokens": 48, "stream": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v1/completions",
        data=json.dumps(body | {"temperature": 0}).encode(),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            assert res.readline().startswith(b"data: {")  # the stream is open
            issued.revoke("alice", actor="ops")
            rest = res.read().decode()
    finally:
        slow.remove()
        server.stop(grace=0.5)
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "invalid_api_key"
    assert events[-1]["error"]["message"] == "authorization: unknown token"
    assert "[DONE]" not in rest
    assert len([e for e in events if "choices" in e]) < 47  # it ended early
