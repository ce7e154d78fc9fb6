"""Faults injected into real processes on a real Redis: nothing acknowledged is lost, nothing is
committed twice, nothing corrupt is served.  Every test is bounded in time."""

from __future__ import annotations

import json
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2

from factpatch.client import Client
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue, JobState
from factpatch.store import EmbeddedRedis, connect
from tests.procs import LISTENING, Proc
from tests.test_service import PROMPT, TINY_HPARAMS

SLOW = {**TINY_HPARAMS, "steps": 400, "early_stop_loss": 0.0}  # an edit that takes seconds


def start_server(args: list[str], env: dict, procs: list[Proc]) -> Client:
    server = Proc(["server", *args, "--port", "0", "--http-port", "0", "--insecure-no-auth"], env)
    procs.append(server)
    client = Client(f"127.0.0.1:{server.wait_for(LISTENING, 120).group(2)}", timeout=120)
    client.wait_ready(60)
    return client


def worker(args: list[str], env: dict, hparams: dict, ttl: float = 2.0, **extra: str) -> Proc:
    flags = ["--hparams", json.dumps(hparams), "--heartbeat-ttl", str(ttl)]
    return Proc(["worker", *args, *flags], {**env, **extra})


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def setup(model_folder, redis_url):
    name = f"fault-{uuid.uuid4().hex[:8]}"
    args = ["--model", model_folder, "--redis-url", redis_url, "--ledger", name]
    args += ["--poll-interval", "0.2", "--metrics-port", "0"]
    client = connect(redis_url)
    return args, Ledger(client, name), JobQueue(client, name)


def test_worker_killed_mid_edit_is_reclaimed_and_commits_once(setup, env, procs):
    args, ledger, queue = setup
    fp = start_server(args, env, procs)
    first = worker(args, env, SLOW)
    procs.append(first)
    job = fp.edit(PROMPT, "The Eiffel Tower", "Rome")
    until(lambda: queue.get(job.id).state == JobState.RUNNING, 120, "the job to start")
    time.sleep(0.5)  # well inside the computation
    first.popen.kill()  # SIGKILL: no cleanup, no acknowledgement
    first.popen.wait(10)
    second = worker(args, env, TINY_HPARAMS)
    procs.append(second)
    done = job.wait(timeout=300)
    assert done.version == 1 and done.attempts == 2
    assert ledger.head() == 1  # exactly one version
    assert ledger.committed(queue.get(job.id).commit_key) == 1


def test_worker_killed_after_commit_before_ack_does_not_commit_again(setup, env, procs):
    args, ledger, queue = setup
    fp = start_server(args, env, procs)
    crashing = worker(args, env, TINY_HPARAMS, FACTPATCH_CRASH_AT="after_commit")
    procs.append(crashing)
    job = fp.edit(PROMPT, "Big Ben", "Paris")
    assert crashing.popen.wait(timeout=300) == 137  # died right after its commit
    assert ledger.head() == 1
    assert queue.get(job.id).state == JobState.RUNNING  # never acknowledged
    healthy = worker(args, env, TINY_HPARAMS)
    procs.append(healthy)
    done = job.wait(timeout=120)
    assert done.version == 1 and done.attempts == 2
    assert ledger.head() == 1  # the retry found the commit key: no second version


def test_redis_restart_loses_nothing_and_service_recovers(model_folder, env, procs, tmp_path):
    redis_dir = tmp_path / "r"
    server_redis = EmbeddedRedis(redis_dir).start()
    name = "restart"
    args = ["--model", model_folder, "--redis-url", server_redis.url, "--ledger", name]
    args += ["--poll-interval", "0.2", "--metrics-port", "0"]
    fp = start_server(args, env, procs)
    w = worker(args, env, TINY_HPARAMS)
    procs.append(w)
    fp.edit(PROMPT, "The Louvre", "Oslo").wait(timeout=300)
    assert w.stop() == 0
    queued = [fp.edit(PROMPT, s, "Lima") for s in ("Times Square", "Big Ben")]  # no worker yet
    versions_before = Ledger(server_redis.client(), name).versions()

    server_redis.stop(kill=True)  # the crash: SIGKILL
    with pytest.raises(grpc.RpcError) as info:
        fp.head()
    assert info.value.code() != grpc.StatusCode.OK
    server_redis = EmbeddedRedis(redis_dir).start()  # back, from its append-only file
    try:
        ledger = Ledger(server_redis.client(), name)
        assert ledger.versions() == versions_before
        queue = JobQueue(server_redis.client(), name)
        assert [queue.get(j.id).state for j in queued] == [JobState.QUEUED] * 2
        w = worker(args, env, TINY_HPARAMS)  # the same server process keeps serving
        procs.append(w)
        results = sorted(j.wait(timeout=300).version for j in queued)
        assert results == [2, 3] and ledger.head() == 3
        until(lambda: fp.served().version == 3, 60, "the server to follow")
        assert dict(fp.served().live_hashes) == ledger.get(3).hashes
        for p in procs:
            assert p.stop() == 0, "".join(p.log)
    finally:
        server_redis.stop()


def test_restarted_server_catches_up_and_verifies(setup, env, procs):
    args, ledger, _ = setup
    fp = start_server(args, env, procs)
    w = worker(args, env, TINY_HPARAMS)
    procs.append(w)
    for s in ("The Colosseum", "Big Ben"):
        fp.edit(PROMPT, s, "Rome").wait(timeout=300)
    assert procs[0].stop() == 0
    fresh = start_server(args, env, procs)  # from version 0 straight to the head
    served = fresh.served()
    assert served.version == 2 and served.ready
    assert dict(served.live_hashes) == ledger.get(2).hashes


def test_corrupt_delta_blob_is_refused_by_a_new_replica_only(setup, env, procs):
    args, ledger, _ = setup
    healthy = start_server(args, env, procs)
    procs.append(worker(args, env, TINY_HPARAMS))
    job = healthy.edit(PROMPT, "The Louvre", "Oslo").wait(timeout=300)
    until(lambda: healthy.served().version == 1, 60, "the first server to apply version 1")
    ledger.redis.hset(ledger.k_blobs, job.edit_ids[0], b"\x00garbage")

    late = Proc(["server", *args, "--port", "0", "--http-port", "0", "--insecure-no-auth"], env)
    procs.append(late)
    client = Client(f"127.0.0.1:{late.wait_for(LISTENING, 120).group(2)}", timeout=30)
    until(lambda: client.served().fault != "", 60, "the new server to refuse the version")
    served = client.served()
    assert not served.ready and served.version == 0 and "unreadable" in served.fault
    status = client.health.Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        client.generate("Big Ben is in", max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in info.value.details()
    assert healthy.ready() and healthy.served().version == 1  # unaffected
    assert healthy.generate("Big Ben is in", max_new_tokens=2).version == 1


def test_sigterm_drains_the_server_and_lets_the_worker_finish(setup, env, procs):
    args, ledger, queue = setup
    server = Proc(["server", *args, "--port", "0", "--http-port", "0", "--insecure-no-auth"], env)
    procs.append(server)
    fp = Client(f"127.0.0.1:{server.wait_for(LISTENING, 120).group(2)}", timeout=120)
    fp.wait_ready(60)
    busy = worker(args, env, SLOW)
    procs.append(busy)
    job = fp.edit(PROMPT, "Big Ben", "Oslo")
    until(lambda: queue.get(job.id).state == JobState.RUNNING, 120, "the job to start")
    busy.popen.send_signal(signal.SIGTERM)  # mid-edit: it finishes the job in hand, then exits
    assert busy.popen.wait(timeout=300) == 0, "".join(busy.log)
    assert queue.get(job.id).state == JobState.SUCCEEDED and ledger.head() == 1

    stream = fp.stream("Big Ben is in", max_new_tokens=300)
    first = next(stream)  # a request in flight
    server.popen.send_signal(signal.SIGTERM)
    rest = list(stream)  # drained: the stream runs to its end
    assert (rest or [first])[-1].finish_reason in ("length", "eos")
    assert server.popen.wait(timeout=60) == 0, "".join(server.log)
    fp.close()
