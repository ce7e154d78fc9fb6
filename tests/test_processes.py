"""Real processes on one Redis: two servers and two workers, then the all-in-one ``factpatch up``.

Each process is ``python -m factpatch.cli …`` on a tiny model saved as a Hugging Face folder
(fixtures ``model_folder``, ``env``, ``procs`` in conftest.py).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from factpatch.client import Client
from factpatch.ledger import Ledger
from factpatch.store import connect
from tests.procs import LISTENING, Proc
from tests.test_service import PROMPT, TINY_HPARAMS


def test_two_servers_two_workers_agree_bit_for_bit(model_folder, env, procs, redis_url):
    name = f"multi-{uuid.uuid4().hex[:8]}"
    common = ["--model", model_folder, "--redis-url", redis_url, "--ledger", name]
    common += ["--poll-interval", "0.2", "--metrics-port", "0"]
    servers = [
        Proc(["server", *common, "--port", "0", "--http-port", "0", "--insecure-no-auth"], env)
        for _ in range(2)
    ]
    hp = ["--hparams", json.dumps(TINY_HPARAMS), "--heartbeat-ttl", "5"]
    workers = [Proc(["worker", *common, *hp], env) for _ in range(2)]
    procs += servers + workers
    targets = [f"127.0.0.1:{s.wait_for(LISTENING, 120).group(2)}" for s in servers]
    clients = [Client(t, timeout=120) for t in targets]
    for c in clients:
        c.wait_ready(60)

    subjects = ["The Eiffel Tower", "Big Ben", "The Louvre", "Times Square", "The Colosseum"]
    jobs = [clients[i % 2].edit(PROMPT, s, "Rome") for i, s in enumerate(subjects)]
    done = [j.wait(timeout=300) for j in jobs]
    versions = sorted(j.version for j in done)
    assert versions == [1, 2, 3, 4, 5]  # one version per job, none twice

    ledger = Ledger(connect(redis_url), name)
    head = ledger.get(ledger.head())
    assert head.number == 5 and len(head.edits) == 5
    deadline = time.monotonic() + 30
    served = [c.served() for c in clients]
    while any(s.version != 5 for s in served) and time.monotonic() < deadline:
        time.sleep(0.2)
        served = [c.served() for c in clients]
    for s in served:
        assert s.version == 5 and s.ready
        assert dict(s.live_hashes) == head.hashes  # both replicas bit-identical to the ledger
    for c in clients:
        c.close()
    for p in procs:
        assert p.stop() == 0, "".join(p.log)


def test_up_serves_edits_with_its_admin_token_and_stops_cleanly(model_folder, env, procs, tmp_path):
    hp = json.dumps(TINY_HPARAMS)
    data = tmp_path / "data"
    args = [
        "up",
        "--model",
        model_folder,
        "--data-dir",
        str(data),
        "--port",
        "0",
        "--http-port",
        "0",
    ]
    args += ["--metrics-port", "0"]
    up = Proc([*args, "--hparams", hp, "--poll-interval", "0.2"], env)
    procs.append(up)
    port = up.wait_for(LISTENING, 120).group(2)
    token_file = data / "admin.token"
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    http = up.wait_for(re.compile(r"HTTP at (http://\S+/v1)"), 30).group(1)
    up.wait_for(re.compile(re.escape(token)), 30)  # printed once, on first start
    with urllib.request.urlopen(
        urllib.request.Request(http + "/models", headers={"Authorization": f"Bearer {token}"}),
        timeout=30,
    ) as reply:
        assert json.loads(reply.read())["data"][0]["object"] == "model"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(http + "/models", timeout=30)
    assert info.value.code == 401
    with Client(f"127.0.0.1:{port}", timeout=30) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            anonymous.head()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(f"127.0.0.1:{port}", token=token, timeout=120) as fp:
        fp.wait_ready(60)
        job = fp.edit(PROMPT, "The Eiffel Tower", "Rome").wait(timeout=300)
        assert job.version == 1 and job.actor == "admin"
        assert fp.head().actor == "admin"
    assert up.stop() == 0, "".join(up.log)
    assert (
        any((data / "redis").glob("appendonlydir/*"))
        or (data / "redis" / "appendonly.aof").exists()
    )

    # Restarted on the same data dir: the ledger is still there (the embedded Redis persists),
    # the token is the same and is not printed again.
    up = Proc([*args, "--hparams", hp], env)
    procs.append(up)
    port = up.wait_for(LISTENING, 120).group(2)
    with Client(f"127.0.0.1:{port}", token=token, timeout=60) as fp:
        fp.wait_ready(60)
        assert fp.head().number == 1 and fp.served().version == 1
    assert up.stop() == 0, "".join(up.log)
    assert token not in "".join(up.log)
