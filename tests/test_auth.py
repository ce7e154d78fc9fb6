"""Access control and transport security on a real server: tokens and scopes, the recorded
actor, per-client stream limits, TLS and mutual TLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from factpatch.auth import Token, TokenStore, load_tokens, token_sha256
from factpatch.client import TLS, Client
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue
from factpatch.rpc import pb
from factpatch.server import build_server
from factpatch.store import connect

TOKENS = {"reader": "r-" + "x" * 30, "editor": "e-" + "y" * 30, "root": "a-" + "z" * 30}
SCOPES = {"reader": {"infer"}, "editor": {"edit"}, "root": {"admin"}}


def store() -> TokenStore:
    return TokenStore([Token(n, token_sha256(t), frozenset(SCOPES[n])) for n, t in TOKENS.items()])


@pytest.fixture
def secured(tiny_llama, redis_url):
    name = f"auth-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    ledger, queue = Ledger(client, name), JobQueue(client, name)
    settings = Settings(ledger=name, port=0, http_port=0, max_streams_per_client=2)
    server = build_server(tiny_llama, ledger, queue, settings, auth=store()).start()
    yield f"127.0.0.1:{server.port}", ledger
    server.stop(grace=0.5)


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_scopes_nest_and_are_enforced(secured):
    target, ledger = secured
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    with Client(target) as nobody, Client(target, token="wrong") as wrong:
        assert code_of(nobody.head) == unauthenticated
        assert code_of(wrong.head) == unauthenticated
        assert nobody.ready()  # health needs no token (probes)
    clients = {n: Client(target, token=t) for n, t in TOKENS.items()}
    try:
        expected = {  # (reader, editor, root)
            "score": (ok, ok, ok),
            "edit": (denied, ok, ok),
            "rollback": (denied, denied, ok),
        }
        for name, c in clients.items():
            col = list(TOKENS).index(name)
            assert code_of(c.score, "Big Ben is in", " Rome") == expected["score"][col]
            edit = code_of(c.submit_edits, [dict(prompt="{} is in", subject="Big Ben", target="")])
            # a bad edit: INVALID_ARGUMENT once authorised, so nothing is queued either way
            want = expected["edit"][col]
            assert edit == (grpc.StatusCode.INVALID_ARGUMENT if want == ok else want)
            assert code_of(c.rollback, 0) == expected["rollback"][col]
        assert ledger.get(ledger.head()).actor == "root"  # the rollback records who asked
    finally:
        for c in clients.values():
            c.close()


def test_streams_per_client_are_capped(secured):
    target, _ = secured
    with Client(target, token=TOKENS["reader"]) as c:
        request = pb.GenerateRequest(prompt="Big Ben is in", max_new_tokens=200)
        opened = [c.gen.Generate(request, metadata=c.metadata) for _ in range(2)]
        for s in opened:
            next(s)  # both streams are running
        third = c.gen.Generate(request, metadata=c.metadata)
        with pytest.raises(grpc.RpcError) as info:
            next(third)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max-streams-per-client" in info.value.details()
        for s in opened:
            s.cancel()


def test_tokens_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"name": "ci", "sha256": token_sha256("t1"), "scopes": ["edit"]}]))
    monkeypatch.setenv("FACTPATCH_ADMIN_TOKEN", "boss")
    tokens = load_tokens(str(path))
    assert tokens.authenticate("t1").name == "ci"
    assert tokens.authenticate("boss").allows("admin")
    assert tokens.authenticate("t2") is None
    path.write_text(json.dumps([{"name": "x", "sha256": "00", "scopes": ["root"]}]))
    with pytest.raises(ValueError, match="unknown scopes"):
        load_tokens(str(path))


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certs(tmp_path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path / "pki"
    d.mkdir()
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=factpatch-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            "-subj",
            f"/CN={who}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def test_mutual_tls(tiny_llama, redis_url, certs):
    name = f"tls-{uuid.uuid4().hex[:8]}"
    client = connect(redis_url)
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    settings = Settings(ledger=name, port=0, http_port=0, host="127.0.0.1")
    server = build_server(
        tiny_llama, Ledger(client, name), JobQueue(client, name), settings, credentials
    ).start()
    target = f"localhost:{server.port}"
    try:
        ca = (certs / "ca.pem").read_bytes()
        mutual = TLS(ca, (certs / "client.pem").read_bytes(), (certs / "client.key").read_bytes())
        with Client(target, tls=mutual, timeout=20) as fp:
            assert fp.head().number == 0
        with Client(target, tls=TLS(ca), timeout=5) as no_cert:
            assert code_of(no_cert.head) == grpc.StatusCode.UNAVAILABLE  # handshake refused
        with Client(target, timeout=5) as plaintext:
            assert code_of(plaintext.head) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0.5)
