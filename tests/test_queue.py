"""The job queue on a real Redis: submit, claim, acknowledge after the result, reclaim from dead
workers (by heartbeat), bounded retries, dead letters, cancel, watch, restart."""

from __future__ import annotations

import queue as stdqueue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from factpatch.ledger import Ledger
from factpatch.queue import (
    GROUP,
    TERMINAL_STATES,
    TRANSITIONS,
    Job,
    JobQueue,
    JobState,
    LeaseLostError,
    UnknownJobError,
    can_transition,
    states,
)
from factpatch.store import EmbeddedRedis, connect

TTL = 0.5  # heartbeat TTL of most tests, seconds


@pytest.fixture(autouse=True)
def _time_bound() -> Iterator[None]:
    """Each test here ends within 30 s, failing rather than hanging."""

    def expire(*_: object) -> None:
        raise TimeoutError("test_queue: test ran over 30 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return connect(redis_url)


@pytest.fixture
def make_queue(client: redis.Redis) -> Callable[..., JobQueue]:
    """Queues under fresh names, so tests never see each other's jobs."""

    def make(**kwargs: Any) -> JobQueue:
        kwargs.setdefault("heartbeat_ttl", TTL)
        return JobQueue(client, name=f"test-{uuid.uuid4().hex[:12]}", **kwargs)

    return make


@pytest.fixture
def q(make_queue: Callable[..., JobQueue]) -> JobQueue:
    return make_queue()


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s")


def pending(q: JobQueue, kind: str) -> int:
    return int(q.redis.xpending(q.stream_key(kind), GROUP)["pending"])


def claim_one(q: JobQueue, consumer: str, kinds: tuple[str, ...] = ("edit",)):
    leases = q.claim(consumer, list(kinds), block_ms=200)
    assert len(leases) == 1, leases
    return leases[0]


# -- the state table -------------------------------------------------------------------------


def test_state_table_is_complete_and_terminal_states_have_no_exit():
    assert set(TRANSITIONS) == set(JobState)
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset() and state.terminal
    assert can_transition("queued", "running") and can_transition(JobState.RUNNING, "queued")
    assert not can_transition("succeeded", "queued") and not can_transition("queued", "failed")
    for state in JobState:  # every state is drawn in the module's diagram
        assert state.name in (states.__doc__ or "")
    assert str(JobState.DEAD) == "dead" and JobState("dead") is JobState.DEAD


def test_job_json_round_trip_keeps_payload_exact():
    job = Job(
        "a" * 32,
        "edit",
        {"requests": [], "nested": {"x": [1, 2.5e-17]}, "f": 0.1 + 0.2},
        JobState.RUNNING,
        1712345678.1234567,
        1712345679.5,
        attempts=2,
        result={"version": 7},
        worker="w",
    )
    assert Job.from_json(job.to_json()) == job
    assert Job.from_hash(job.to_hash()) == job
    assert job.commit_key == f"job:{job.id}"


# -- clients ---------------------------------------------------------------------------------


def test_submit_get_and_list_newest_first(q: JobQueue):
    payload = {"requests": [], "prompt": "{} is in", "subject": "X", "w": 0.1 + 0.2}
    edit, created = q.submit("edit", payload, actor="alice")
    assert created and edit.state is JobState.QUEUED and edit.attempts == 0
    assert len(edit.id) == 32 and edit.actor == "alice" and edit.worker is None
    assert q.get(edit.id) == edit  # payload back exactly: [] stays a list, floats unrounded
    trace, _ = q.submit("trace", {"prompt": "p"})
    third, _ = q.submit("edit", {"n": 3})
    assert [j.id for j in q.list()] == [third.id, trace.id, edit.id]
    assert [j.id for j in q.list(kind="edit")] == [third.id, edit.id]
    assert [j.id for j in q.list(limit=1)] == [third.id]
    assert [j.id for j in q.list(before=trace.created)] == [edit.id]
    assert q.list(state="running") == []
    assert {j.id for j in q.list(state=JobState.QUEUED)} == {edit.id, trace.id, third.id}
    assert q.depth("edit") == 2 and q.depth("trace") == 1
    assert 0 <= q.oldest_age("edit") < 5 and q.oldest_age("trace") > 0


def test_idempotency_key_returns_the_same_job_and_queues_nothing(q: JobQueue):
    first, created = q.submit("edit", {"n": 1}, idempotency_key="req-1")
    again, created_again = q.submit("edit", {"n": 1}, idempotency_key="req-1")
    assert created and not created_again and again == first
    assert q.redis.xlen(q.stream_key("edit")) == 1 and len(q.list()) == 1
    # Concurrent submits of one key: exactly one job.
    results: list[tuple[Job, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(q.submit("edit", {}, "req-2")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert q.redis.xlen(q.stream_key("edit")) == 2
    with pytest.raises(ValueError, match="idempotency_key: 'req-1' was used for edit job"):
        q.submit("trace", {}, idempotency_key="req-1")
    # Still the same job once it has finished: a key never runs twice.
    claim_one(q, "w").succeed({"version": 1})
    job, created = q.submit("edit", {"n": 1}, idempotency_key="req-1")
    assert not created and job.id == first.id and job.state is JobState.SUCCEEDED
    assert q.depth("edit") == 1


def test_claim_then_succeed_stores_the_result_and_acknowledges(q: JobQueue):
    job, _ = q.submit("edit", {"n": 1})
    assert q.claim("w1", ["trace"], block_ms=50) == []  # other kind: nothing
    lease = claim_one(q, "w1")
    assert lease.job.id == job.id and lease.kind == "edit"
    running = q.get(job.id)
    assert (running.state, running.attempts, running.worker) == (JobState.RUNNING, 1, "w1")
    assert pending(q, "edit") == 1 and q.depth("edit") == 1
    lease.progress({"phase": "covariance"})
    assert q.get(job.id).progress == {"phase": "covariance"}
    done = lease.succeed({"version": 7})
    assert done.state is JobState.SUCCEEDED and done.result == {"version": 7}
    assert q.get(job.id) == done
    assert pending(q, "edit") == 0 and q.depth("edit") == 0 and q.oldest_age("edit") == 0.0
    assert q.claim("w1", ["edit"], block_ms=50) == []
    with pytest.raises(LeaseLostError, match=f"job_id: {job.id}"):
        lease.succeed({"version": 8})  # once only
    assert q.get(job.id).result == {"version": 7}


def test_blocking_claim_wakes_when_a_job_arrives(q: JobQueue):
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.extend(q.claim("w", ["edit"], block_ms=5000)))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    job, _ = q.submit("edit", {})
    waiter.join(6)
    assert [lease.job.id for lease in got] == [job.id]
    assert time.monotonic() - start < 3


def test_claim_respects_count_and_puts_back_extra_entries(q: JobQueue):
    e0, _ = q.submit("edit", {"n": 0})
    e1, _ = q.submit("edit", {"n": 1})
    t0, _ = q.submit("trace", {"n": 0})
    leases = q.claim("w", ["trace", "edit"], count=2, block_ms=50)
    assert [le.job.id for le in leases] == [t0.id, e0.id]  # kinds in the order given
    # One read over two streams may return more entries than asked for (a blocking claim
    # does such a read): the extra one goes back, still queued, attempts unchanged.
    t1, _ = q.submit("trace", {"n": 1})
    [lease] = q._read("w", ["edit", "trace"], 1, None)
    assert lease.job.id == e1.id
    back = q.get(t1.id)
    assert back.state is JobState.QUEUED and back.attempts == 0
    assert pending(q, "trace") == 1 and q.depth("trace") == 2  # t0 leased, t1 queued
    assert [le.job.id for le in q.claim("w", ["trace"], count=5, block_ms=50)] == [t1.id]


def test_watch_yields_queued_running_succeeded_in_order(q: JobQueue):
    job, _ = q.submit("edit", {})
    seen: stdqueue.Queue[Job] = stdqueue.Queue()

    def follow() -> None:
        for update in q.watch(job.id, timeout=10, poll=5.0):  # poll slow: pub/sub must wake it
            seen.put(update)

    watcher = threading.Thread(target=follow)
    watcher.start()
    assert seen.get(timeout=5).state is JobState.QUEUED
    lease = claim_one(q, "w")
    assert seen.get(timeout=2).state is JobState.RUNNING
    lease.progress({"step": 1})
    assert seen.get(timeout=2).progress == {"step": 1}
    lease.succeed({"version": 1})
    last = seen.get(timeout=2)
    assert last.state is JobState.SUCCEEDED and last.result == {"version": 1}
    watcher.join(5)
    assert not watcher.is_alive() and seen.empty()


def test_watch_stops_at_a_terminal_state_or_the_timeout(q: JobQueue):
    job, _ = q.submit("edit", {})
    start = time.monotonic()
    assert [j.state for j in q.watch(job.id, timeout=0.3, poll=0.1)] == [JobState.QUEUED]
    assert 0.25 < time.monotonic() - start < 2
    q.cancel(job.id)
    assert [j.state for j in q.watch(job.id)] == [JobState.CANCELLED]
    with pytest.raises(UnknownJobError, match="job_id: 'nope'"):
        next(q.watch("nope"))


# -- dead workers ----------------------------------------------------------------------------


def test_a_dead_workers_job_is_reclaimed_after_its_heartbeat_expires(q: JobQueue):
    job, _ = q.submit("edit", {})
    dead = claim_one(q, "w-dead")  # claim heartbeats once; no thread keeps it alive: "dies"
    assert q.claim("w-live", ["edit"], block_ms=0) == []  # not before the heartbeat expires
    lease = wait_until(lambda: q.claim("w-live", ["edit"], block_ms=50), timeout=5)[0]
    assert lease.job.id == job.id and lease.job.attempts == 2 and lease.job.worker == "w-live"
    assert "w-dead stopped heartbeating" in (lease.job.error or "")
    assert not dead.held() and lease.held()
    # The presumed-dead worker comes back: everything it tries is refused.
    with pytest.raises(LeaseLostError, match="no longer leased to 'w-dead'"):
        dead.progress({"phase": "late"})
    with pytest.raises(LeaseLostError):
        dead.succeed({"version": 99})
    with pytest.raises(LeaseLostError):
        dead.fail("late")
    assert lease.succeed({"version": 1}).result == {"version": 1}
    assert pending(q, "edit") == 0
    consumers = {_s(c["name"]) for c in q.redis.xinfo_consumers(q.stream_key("edit"), GROUP)}
    assert "w-dead" not in consumers  # a dead consumer with nothing left is removed


def test_a_live_worker_holding_a_job_past_the_ttl_is_not_robbed(make_queue):
    q = make_queue(heartbeat_ttl=1.0)
    job, _ = q.submit("edit", {})
    lease = claim_one(q, "w-slow")
    stop = q.start_heartbeat("w-slow")
    try:
        deadline = time.monotonic() + 2.5  # a long edit: 2.5 × the TTL
        while time.monotonic() < deadline:
            assert q.claim("w-thief", ["edit"], block_ms=100) == []
        assert lease.held()
        assert lease.succeed({"version": 3}).state is JobState.SUCCEEDED
    finally:
        stop()
    assert q.get(job.id).attempts == 1


def test_a_delivered_but_never_started_entry_is_reclaimed(q: JobQueue):
    """A reader that fails between XREADGROUP and starting the job (its process lives on)."""
    job, _ = q.submit("edit", {})
    q.redis.xreadgroup(GROUP, "w-flaky", {q.stream_key("edit"): ">"}, count=1)
    stop = q.start_heartbeat("w-flaky")
    try:
        lease = wait_until(lambda: q.claim("w2", ["edit"], block_ms=50), timeout=5)[0]
    finally:
        stop()
    assert lease.job.id == job.id and lease.job.attempts == 1 and lease.job.worker == "w2"


def test_a_reclaimed_edit_commits_one_version(q: JobQueue, ledger: Ledger):
    """Crash after the commit, before the acknowledgement: the rerun finds its version."""
    ledger.init("a" * 64, "m")
    job, _ = q.submit("edit", {"n": 1}, idempotency_key="client-key")

    def work(lease) -> int:
        commit = ledger.commit(0, [], {"kind": "edit"}, {}, idempotency_key=lease.job.commit_key)
        return commit.version.number

    first = claim_one(q, "w-crashes")
    assert work(first) == 1  # committed … then the worker dies before succeed()
    second = wait_until(lambda: q.claim("w2", ["edit"], block_ms=50), timeout=5)[0]
    assert second.job.id == job.id
    version = work(second)
    assert version == 1 and ledger.head() == 1  # no second version
    assert second.succeed({"version": version}).result == {"version": 1}


# -- retries and dead letters ----------------------------------------------------------------


def test_fail_retries_until_max_attempts_then_dead_letters(make_queue):
    q = make_queue(max_attempts=3)
    job, _ = q.submit("edit", {})
    for attempt in (1, 2):
        lease = claim_one(q, "w")
        assert lease.job.attempts == attempt
        requeued = lease.fail(f"boom {attempt}")
        assert requeued.state is JobState.QUEUED and requeued.error == f"boom {attempt}"
        assert requeued.worker is None and pending(q, "edit") == 0 and q.depth("edit") == 1
    lease = claim_one(q, "w")
    dead = lease.fail("boom 3")
    assert dead.state is JobState.DEAD and dead.attempts == 3
    assert dead.error == "attempts: 3 of 3 used; last error: boom 3"
    assert q.depth("edit") == 0 and pending(q, "edit") == 0
    assert q.claim("w", ["edit"], block_ms=50) == []
    [letter] = q.dead_letters()
    assert letter["job_id"] == job.id and letter["kind"] == "edit"
    assert letter["reason"] == dead.error and letter["attempts"] == 3


def test_fail_without_retry_is_final(q: JobQueue):
    job, _ = q.submit("trace", {})
    failed = claim_one(q, "w", ("trace",)).fail("prompt: subject not found", retry=False)
    assert failed.state is JobState.FAILED and failed.error == "prompt: subject not found"
    assert failed.attempts == 1 and q.depth("trace") == 0 and q.dead_letters() == []
    assert q.list(state="failed")[0].id == job.id


def test_a_worker_dying_on_the_last_attempt_dead_letters_the_job(make_queue):
    q = make_queue(max_attempts=1)
    job, _ = q.submit("edit", {})
    claim_one(q, "w-dead")

    def dead_lettered() -> bool:
        assert q.claim("w2", ["edit"], block_ms=50) == []  # never handed out again
        return q.get(job.id).state is JobState.DEAD

    wait_until(dead_lettered)
    dead = q.get(job.id)
    assert dead.error == (
        "attempts: 1 of 1 used; worker w-dead stopped heartbeating during the last"
    )
    assert q.dead_letters()[0]["reason"] == dead.error
    assert q.depth("edit") == 0 and pending(q, "edit") == 0


# -- cancel ----------------------------------------------------------------------------------


def test_a_cancelled_queued_job_never_reaches_a_worker(q: JobQueue):
    job, _ = q.submit("edit", {})
    other, _ = q.submit("edit", {})
    cancelled = q.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.cancel_requested
    assert q.depth("edit") == 1 and q.oldest_age("edit") < 5
    assert [le.job.id for le in q.claim("w", ["edit"], count=5, block_ms=50)] == [other.id]
    assert q.get(job.id).state is JobState.CANCELLED and q.get(job.id).attempts == 0


def test_a_job_cancelled_after_delivery_is_acknowledged_and_skipped(q: JobQueue):
    job, _ = q.submit("edit", {})
    [[_, [(entry, _)]]] = q.redis.xreadgroup(GROUP, "w-slow", {q.stream_key("edit"): ">"}, count=1)
    q.cancel(job.id)  # delivered, not yet started: the reader's start acks and skips it
    lease = q._start("edit", _s(entry), job.id, "w-slow", "new", "w-slow")
    assert lease is None and pending(q, "edit") == 0 and q.depth("edit") == 0
    assert q.get(job.id).state is JobState.CANCELLED


def test_cancel_running_is_seen_by_the_lease(q: JobQueue):
    job, _ = q.submit("edit", {})
    lease = claim_one(q, "w")
    assert not lease.cancel_requested()
    requested = q.cancel(job.id)
    assert requested.state is JobState.RUNNING and requested.cancel_requested
    assert lease.cancel_requested()
    done = lease.cancelled()
    assert done.state is JobState.CANCELLED and pending(q, "edit") == 0
    assert q.cancel(job.id) == done  # terminal: unchanged


def test_fail_after_a_cancel_request_does_not_retry(q: JobQueue):
    job, _ = q.submit("edit", {})
    lease = claim_one(q, "w")
    q.cancel(job.id)
    assert lease.fail("interrupted").state is JobState.CANCELLED
    assert q.depth("edit") == 0


def test_a_finished_job_cannot_be_cancelled(q: JobQueue):
    job, _ = q.submit("edit", {})
    done = claim_one(q, "w").succeed({"version": 1})
    assert q.cancel(job.id) == done


# -- concurrency and persistence -------------------------------------------------------------


def test_concurrent_workers_each_get_a_job_once(q: JobQueue):
    ids = {q.submit("edit", {"n": i})[0].id for i in range(30)}
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        stop = q.start_heartbeat(name)
        try:
            while True:
                leases = q.claim(name, ["edit"], block_ms=100)
                if not leases:
                    return
                for lease in leases:
                    with lock:
                        taken.append(lease.job.id)
                    lease.succeed({"by": name})
        finally:
            stop()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(taken) == sorted(ids)
    assert all(q.get(i).state is JobState.SUCCEEDED and q.get(i).attempts == 1 for i in ids)
    assert q.depth("edit") == 0


def test_jobs_survive_a_redis_crash(tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        q = JobQueue(server.client(), "persist", heartbeat_ttl=TTL)
        waiting, _ = q.submit("edit", {"n": 1}, idempotency_key="k")
        running, _ = q.submit("trace", {"n": 2})
        claim_one(q, "w-gone", ("trace",))
        server.stop(kill=True)  # SIGKILL: only what was fsynced survives
        server.start()
        q = JobQueue(server.client(), "persist", heartbeat_ttl=TTL)
        assert q.get(waiting.id) == waiting and q.get(running.id).state is JobState.RUNNING
        assert q.submit("edit", {}, idempotency_key="k") == (waiting, False)
        assert claim_one(q, "w-new").job.id == waiting.id
        reclaimed = wait_until(lambda: q.claim("w-new", ["trace"], block_ms=50), timeout=5)
        assert reclaimed[0].job.id == running.id and reclaimed[0].job.attempts == 2
    finally:
        server.stop()


# -- errors ----------------------------------------------------------------------------------


def test_errors_name_the_field(q: JobQueue, client: redis.Redis):
    with pytest.raises(ValueError, match="kind: 'model'"):
        q.submit("model", {})
    with pytest.raises(ValueError, match="payload: must be a dict"):
        q.submit("edit", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="payload: not JSON-serialisable"):
        q.submit("edit", {"x": object()})
    with pytest.raises(ValueError, match="idempotency_key"):
        q.submit("edit", {}, idempotency_key="k" * 300)
    with pytest.raises(UnknownJobError, match="job_id: 'f00' does not exist") as err:
        q.get("f00")
    assert isinstance(err.value, KeyError) and err.value.job_id == "f00"
    with pytest.raises(UnknownJobError, match="job_id"):
        q.cancel("f00")
    with pytest.raises(ValueError, match="kinds: 'x'"):
        q.claim("w", ["x"])
    with pytest.raises(ValueError, match="kinds: at least one"):
        q.claim("w", [])
    with pytest.raises(ValueError, match="consumer"):
        q.claim("", ["edit"])
    with pytest.raises(ValueError, match="count"):
        q.claim("w", ["edit"], count=0)
    with pytest.raises(ValueError, match="state: 'done'"):
        q.list(state="done")
    with pytest.raises(ValueError, match="kind"):
        q.depth("x")
    with pytest.raises(ValueError, match="name"):
        JobQueue(client, "a:b")
    with pytest.raises(ValueError, match="max_attempts"):
        JobQueue(client, "a", max_attempts=0)
    q.submit("edit", {})
    lease = claim_one(q, "w")
    with pytest.raises(ValueError, match="result: must be a dict"):
        lease.succeed(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error: must be a non-empty string"):
        lease.fail("")
    with pytest.raises(ValueError, match="progress: not JSON-serialisable"):
        lease.progress({"x": float("nan")})


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
