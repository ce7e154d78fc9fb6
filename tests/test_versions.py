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
from factpatch.ledger.writer import LedgerWriter
from factpatch.runtime import Batcher, Replica, Sampling, generate, score, stream
from tests.test_batcher import PROMPTS
from tests.test_runtime import random_delta

SAMPLED = Sampling(max_new_tokens=12, temperature=1.0, seed=5)  # sensitive to every logit
LOGPROB_TOLERANCE = 1e-4  # measured: at most 1.9e-6 over every family (float32)


@pytest.fixture
def versions(tiny, ledger):
    """A replica at head 3 (three random rank-one edits) and a twin to materialise any version."""
    twin = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model), cache={})
    replica = Replica(tiny, ledger).start()
    for seed in range(3):
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(tiny, seed)], [[{}]], replica.version
        )
    yield replica, Replica(twin, ledger).start()
    if replica.batcher is not None:
        replica.batcher.stop()


def each_version_as_its_twin(served: Replica, twin: Replica) -> set[str]:
    """For versions 0..3: ``served`` asked for version v (a sampled generation and a score)
    answers as ``twin`` materialised at v; returns the texts seen."""
    texts = set()
    for v in (0, 1, 2, 3):
        twin.apply(v)
        for prompt in PROMPTS[:3]:
            ours = generate(served, prompt, SAMPLED, version=v)
            assert ours.version == v
            assert ours.text == generate(twin, prompt, SAMPLED).text, (v, prompt)
            texts.add(ours.text)
            a, b = score(served, prompt, " Rome", version=v), score(twin, prompt, " Rome")
            assert a.version == v and a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE)
    return texts


@pytest.mark.parametrize("batching", [False, True], ids=["one-at-a-time", "batched"])
def test_a_named_version_equals_a_replica_at_that_version(versions, batching):
    replica, twin = versions
    if batching:
        replica.batcher = Batcher(replica).start()
    texts = each_version_as_its_twin(replica, twin)
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
    LedgerWriter(replica.ledger, replica).rollback(0)  # version 4: no edits
    LedgerWriter(replica.ledger, replica).rollback(3)  # version 5: version 3's edits again
    LedgerWriter(replica.ledger, replica).revert(
        replica.ledger.get(3).edits[0]
    )  # version 6: without the first edit
    rest = list(events)
    assert {e.version for e in [first, *rest]} == {1} and not any(e.restart for e in rest)
    assert first.text + "".join(e.text for e in rest) == expected


def test_an_unknown_version_names_the_field(versions):
    replica, _ = versions
    with pytest.raises(UnknownVersionError, match="version"):
        generate(replica, PROMPTS[0], SAMPLED, version=99)
    with pytest.raises(UnknownVersionError, match="version"):
        score(replica, PROMPTS[0], " Rome", version=99)


@pytest.mark.real_model
def test_named_versions_on_the_bundled_gemma(ledger):
    """Three versions of the bundled model (random rank-one changes of layers 0–2) served from
    a replica at the head equal a copy materialised at each."""
    from factpatch.models import load_model

    handle = load_model("gemma-3-270m", device="cpu")
    twin = Replica(dataclasses.replace(handle, model=copy.deepcopy(handle.model), cache={}), ledger)
    replica = Replica(handle, ledger).start()
    for seed in range(3):
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(handle, seed, scale=1.0)], [[{}]], replica.version
        )
    twin.start()
    replica.batcher = Batcher(replica).start()
    prompt, s = "The Eiffel Tower is located in the city of", Sampling(max_new_tokens=8)
    try:
        texts = set()
        for v in (0, 1, 2):
            twin.apply(v)
            ours = generate(replica, prompt, s, version=v)
            assert ours.version == v and ours.text == generate(twin, prompt, s).text
            texts.add(ours.text)
            a, b = score(replica, prompt, " Paris", version=v), score(twin, prompt, " Paris")
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert replica.version == 3 and len(texts) > 1
    finally:
        replica.batcher.stop()


@pytest.mark.parametrize("batching", [False, True], ids=["one-at-a-time", "batched"])
def test_a_gated_replica_serves_any_version_through_that_versions_gates(
    tiny_llama, tiny_hparams, ledger, batching
):
    """Behind key gates (τ 0.4) a request for version v gets what a gated replica at v gives."""
    from tests.test_runtime import rome_edits

    twin_handle = tiny_llama.clone()
    writer = Replica(tiny_llama.clone(), ledger).start()
    rome_edits(writer, tiny_hparams, 3)  # versions 1..3, keys carried for the gates
    gated = Replica(tiny_llama, ledger, gate=0.4).start()
    reference = Replica(twin_handle, ledger, gate=0.4).start()
    if batching:
        gated.batcher = Batcher(gated).start()
    try:
        texts = each_version_as_its_twin(gated, reference)
        assert gated.version == 3 and len(texts) > 3
    finally:
        if gated.batcher is not None:
            gated.batcher.stop()
