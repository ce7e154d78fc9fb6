"""Any committed version on any request (factpatch/runtime/versions.py): a request that names
version N on a replica at another version gets what a replica materialised at N gives — the same
tokens, log-probabilities within float32 round-off — with and without batching, mixed in one
batch, and undisturbed by rollbacks and reverts while it runs."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest

from factpatch.ledger import UnknownVersionError
from factpatch.runtime import Batcher, Replica, Sampling, generate, score, stream
from tests.test_batcher import PROMPTS
from tests.test_runtime import random_delta

SAMPLED = Sampling(max_new_tokens=12, temperature=1.0, seed=5)  # sensitive to every logit
LOGPROB_TOLERANCE = 1e-4  # measured: differences of order 1e-6 (float32)


@pytest.fixture
def versions(tiny, ledger):
    """A replica at head 3 (three random rank-one edits) and a twin to materialise any version."""
    twin = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model), cache={})
    replica = Replica(tiny, ledger).start()
    for seed in range(3):
        replica.add_edits([random_delta(tiny, seed)], [[{}]], replica.version)
    yield replica, Replica(twin, ledger).start()
    if replica.batcher is not None:
        replica.batcher.stop()


@pytest.mark.parametrize("batching", [False, True], ids=["one-at-a-time", "batched"])
def test_a_named_version_equals_a_replica_at_that_version(versions, batching):
    replica, twin = versions
    if batching:
        replica.batcher = Batcher(replica).start()
    texts = set()
    for v in (0, 1, 2, 3):
        twin.apply(v)
        for prompt in PROMPTS[:3]:
            ours = generate(replica, prompt, SAMPLED, version=v)
            assert ours.version == v
            assert ours.text == generate(twin, prompt, SAMPLED).text, (v, prompt)
            texts.add(ours.text)
            a, b = score(replica, prompt, " Rome", version=v), score(twin, prompt, " Rome")
            assert a.version == v and a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE)
    assert len(texts) > 3  # the versions really differ
    assert replica.version == 3  # the live weights never moved


def test_four_versions_share_one_batch(versions):
    replica, twin = versions
    expected = {}
    for v in range(4):
        twin.apply(v)
        expected[v] = [generate(twin, p, SAMPLED).text for p in PROMPTS]
    replica.batcher = Batcher(replica, max_versions=4).start()
    got: dict[tuple[int, int], str] = {}

    def ask(v: int, i: int) -> None:
        got[v, i] = generate(replica, PROMPTS[i], SAMPLED, version=v).text

    threads = [threading.Thread(target=ask, args=(v, i)) for v in range(4) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: got[k] for k in sorted(got)} == {
        (v, i): expected[v][i] for v in range(4) for i in range(5)
    }
    assert replica.batcher.largest_batch > 5  # versions really were mixed in one batch


def test_rollback_and_revert_do_not_disturb_a_request_in_flight(versions):
    replica, twin = versions
    twin.apply(1)
    long = Sampling(max_new_tokens=60, temperature=1.0, seed=9)
    expected = generate(twin, PROMPTS[0], long).text
    replica.batcher = Batcher(replica).start()
    events = stream(replica, PROMPTS[0], long, version=1)
    first = next(events)
    replica.rollback(0)  # version 4: no edits
    replica.rollback(3)  # version 5: version 3's edits again
    replica.revert(replica.ledger.get(3).edits[0])  # version 6: without the first edit
    rest = list(events)
    assert {e.version for e in [first, *rest]} == {1} and not any(e.restart for e in rest)
    assert first.text + "".join(e.text for e in rest) == expected


def test_an_unknown_version_names_the_field(versions):
    replica, _ = versions
    with pytest.raises(UnknownVersionError, match="version"):
        generate(replica, PROMPTS[0], SAMPLED, version=99)
    with pytest.raises(UnknownVersionError, match="version"):
        score(replica, PROMPTS[0], " Rome", version=99)
