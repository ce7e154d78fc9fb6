"""Continuous batching (factpatch/runtime/batcher.py) on tiny models of every family: batched
requests give what each gives alone, join and leave between steps, keep the version rules."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from factpatch.ledger.writer import LedgerWriter
from factpatch.runtime import Batcher, Replica, Sampling, complete, generate, stream, stream_all
from tests.test_runtime import random_delta

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Rome is",
    "Big Ben is in London, and the city of London is the capital of",
    "A",
    "Danielle Darrieux's mother tongue is",
]


@pytest.fixture
def batched(tiny, ledger):
    replica = Replica(tiny, ledger).start()
    yield replica
    if replica.batcher is not None:
        replica.batcher.stop()


def settings(i: int) -> Sampling:
    """Greedy and seeded sampling, different lengths and stops: each row its own."""
    if i % 2:
        return Sampling(max_new_tokens=6 + 3 * i, temperature=0.9, top_p=0.9, seed=i)
    return Sampling(max_new_tokens=5 + 4 * i, stop=(".",) if i == 2 else ())


def test_concurrent_requests_give_what_each_gives_alone(batched: Replica):
    """Staggered arrivals (rows join a running batch, longer and shorter than it), different
    lengths (rows leave at different steps), sliding-window layers (gemma3's window is 8)."""
    alone = [generate(batched, p, settings(i)).text for i, p in enumerate(PROMPTS)]
    batched.batcher = Batcher(batched, max_running=8).start()
    together: dict[int, str] = {}

    def ask(i: int) -> None:
        time.sleep(0.01 * i)
        together[i] = generate(batched, PROMPTS[i], settings(i)).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))] * 1
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert batched.batcher.largest_batch >= 2  # they really shared steps
    # Steps shared: far fewer global steps than the tokens generated.
    assert batched.batcher.steps < sum(s.max_new_tokens for s in map(settings, range(5)))


def test_a_full_batch_queues_the_rest(batched: Replica):
    batched.batcher = Batcher(batched, max_running=2).start()
    s = Sampling(max_new_tokens=6)
    results = complete(batched, PROMPTS, [s] * len(PROMPTS))  # one group larger than the room
    assert [r.text for r in results] == [generate(batched, p, s).text for p in PROMPTS]
    outs: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: outs.update({i: generate(batched, PROMPTS[i], s).text}))
        for i in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [outs[i] for i in range(5)] == [r.text for r in results]
    assert batched.batcher.largest_batch <= 5


def test_streams_and_logprobs_through_the_batcher(batched: Replica):
    s = Sampling(max_new_tokens=8, logprobs=2)
    direct = generate(batched, PROMPTS[0], s)
    batched.batcher = Batcher(batched).start()
    events = list(stream(batched, PROMPTS[0], s))
    assert "".join(e.text for e in events) == direct.text
    got = [lp for e in events for lp in e.logprobs]
    assert [x.token_id for x in got] == [x.token_id for x in direct.logprobs]
    assert [x.logprob for x in got] == pytest.approx([x.logprob for x in direct.logprobs], abs=1e-4)
    many = list(stream_all(batched, PROMPTS[:3], [Sampling(max_new_tokens=5)] * 3))
    assert {i for i, _ in many} == {0, 1, 2} and len({e.version for _, e in many}) == 1


def test_a_stop_string_or_a_gone_caller_frees_the_row(batched: Replica):
    full = generate(batched, PROMPTS[0], Sampling(max_new_tokens=40)).text
    stop = full[len(full) // 2 :][:2]  # a string the model writes: it must stop there
    batched.batcher = Batcher(batched).start()
    out = generate(batched, PROMPTS[0], Sampling(max_new_tokens=40, stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    it = stream(batched, PROMPTS[1], Sampling(max_new_tokens=200))
    next(it)
    it.close()  # the client went away
    deadline = time.monotonic() + 10
    while batched.batcher._rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batched.batcher._rows  # the rows left; the loop is idle again


def test_a_swap_neither_waits_for_nor_disturbs_running_requests(tiny, ledger):
    """A request keeps the version it started on to the end (the difference to the new live
    weights is added to its rows), so a swap restarts nothing and waits for one step only."""
    replica = Replica(tiny, ledger).start()
    LedgerWriter(replica.ledger, replica).add_edits(
        [random_delta(tiny, 0)], [[{}]], replica.version
    )
    s = Sampling(max_new_tokens=40, temperature=1.0, seed=3)  # sampling: sensitive to logits
    expected = {v: (replica.apply(v), generate(replica, PROMPTS[0], s).text)[1] for v in (0, 1)}
    assert expected[0] != expected[1]
    replica.apply(0)
    replica.batcher = Batcher(replica).start()
    try:
        events = stream(replica, PROMPTS[0], s)
        first = next(events)
        swap = threading.Thread(target=replica.apply, args=(1,))
        swap.start()
        swap.join(timeout=10)
        assert not swap.is_alive() and replica.version == 1  # the stream did not hold it
        rest = list(events)
        assert not any(e.restart for e in [first, *rest])
        assert {first.version} | {e.version for e in rest} == {0}
        assert first.text + "".join(e.text for e in rest) == expected[0]
        assert generate(replica, PROMPTS[0], s).text == expected[1]  # a new request: the head
    finally:
        replica.batcher.stop()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(batched: Replica, monkeypatch):
    batched.batcher = Batcher(batched).start()
    real = batched.batcher._decode
    calls = {"n": 0}

    def flaky(live: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(live)

    monkeypatch.setattr(batched.batcher, "_decode", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        generate(batched, PROMPTS[0], Sampling(max_new_tokens=8))
    assert generate(batched, PROMPTS[0], Sampling(max_new_tokens=8)).finish_reason == "length"
