"""The live runtime: exact versions, rollback and revert by hashes, no torn reads, followers."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from factpatch.editing import EditRequest, apply_delta, compute_edit, materialize
from factpatch.ledger import Ledger, LedgerError, LedgerMismatchError
from factpatch.ledger.writer import LedgerWriter
from factpatch.models import ModelHandle, tensor_sha256, weights_hash
from factpatch.runtime import (
    Batcher,
    Replica,
    RWLock,
    Sampling,
    complete,
    generate,
    score,
    stream,
    stream_all,
)
from factpatch.runtime.generate import MAX_RESTARTS
from tests.conftest import build_tiny, random_delta

SUBJECTS = ["The Eiffel Tower", "The Colosseum", "Big Ben", "The Louvre", "Times Square"]
TARGETS = ["Rome", "Paris", "Tokyo", "Berlin", "Madrid"]


def twin(handle: ModelHandle) -> ModelHandle:
    """A second replica's model: the same base weights in another object."""
    return handle.clone()


def rome_edits(replica: Replica, hparams, n: int) -> dict[int, str]:
    """Compute and commit n ROME edits one after another; weights hash per version."""
    seen = {0: weights_hash(replica.handle.model)}
    for subject, target in list(zip(SUBJECTS, TARGETS, strict=True))[:n]:
        request = EditRequest("{} is located in the city of", subject, target)
        delta = compute_edit(replica.handle, request, hparams)
        commit = LedgerWriter(replica.ledger, replica).add_edits(
            [delta], [[request.to_dict()]], computed_on=replica.version
        )
        assert commit.created and replica.version == commit.version.number
        seen[replica.version] = weights_hash(replica.handle.model)
    return seen


def test_rollback_and_revert_restore_weights_bit_for_bit(tiny_llama, tiny_hparams, ledger):
    fresh = twin(tiny_llama)  # the same base, never edited
    replica = Replica(tiny_llama, ledger).start()
    seen = rome_edits(replica, tiny_hparams, 5)
    assert len(set(seen.values())) == 6  # every edit changed the weights

    back = LedgerWriter(replica.ledger, replica).rollback(2).version  # version 6
    assert back.edits == ledger.get(2).edits and back.hashes == ledger.get(2).hashes
    assert weights_hash(tiny_llama.model) == seen[2]
    forward = LedgerWriter(replica.ledger, replica).rollback(5).version  # version 7
    assert weights_hash(tiny_llama.model) == seen[5] and forward.hashes == ledger.get(5).hashes

    edits = list(ledger.get(5).edits)
    reverted, tainted = LedgerWriter(replica.ledger, replica).revert(
        edits[2]
    )  # version 8: without the middle edit
    remaining = [e for i, e in enumerate(edits) if i != 2]
    assert list(reverted.version.edits) == remaining
    assert tainted == edits[3:]  # edits 4 and 5 were computed on models containing edit 3
    # A fresh materialisation of the remaining list on the never-edited twin.
    paths = sorted(reverted.version.hashes)
    base = {p: fresh.module(p).weight.detach().clone() for p in paths}
    weights = materialize(fresh, base, [ledger.delta(e) for e in remaining])
    assert {p: tensor_sha256(w) for p, w in weights.items()} == reverted.version.hashes
    live = {p: tensor_sha256(tiny_llama.module(p).weight) for p in paths}
    assert live == reverted.version.hashes

    with pytest.raises(ValueError, match=r"edit_id: .* not active"):
        LedgerWriter(replica.ledger, replica).revert(edits[2])
    assert ledger.head() == 8


def test_bfloat16_edits_take_effect_and_roll_back_bit_for_bit(tokenizer, tiny_hparams, ledger):
    """bfloat16 is the default on CUDA: the update is computed in float32 from the bfloat16
    weights and rounded once when applied; rolling back restores the base weights bit for bit,
    and a second replica reaches the same bytes."""
    handle = build_tiny("llama", tokenizer, dtype=torch.bfloat16)
    other = twin(handle)
    replica = Replica(handle, ledger).start()
    prompt = "The Eiffel Tower is located in the city of"
    p_before = math.exp(score(replica, prompt, " Rome").logprob)
    seen = rome_edits(replica, tiny_hparams, 2)
    assert handle.model.dtype == torch.bfloat16 and len(set(seen.values())) == 3
    assert math.exp(score(replica, prompt, " Rome").logprob) > 1.3 * p_before
    follower = Replica(other, ledger).start()
    assert weights_hash(other.model) == seen[2]
    LedgerWriter(replica.ledger, replica).rollback(0)
    assert weights_hash(handle.model) == seen[0]
    follower.catch_up()
    assert weights_hash(other.model) == seen[0]


def test_a_new_replica_catches_up_to_identical_weights(tiny_llama, tiny_hparams, ledger):
    other = twin(tiny_llama)
    replica = Replica(tiny_llama, ledger).start()
    seen = rome_edits(replica, tiny_hparams, 3)
    late = Replica(other, ledger).start()  # from version 0 straight to the head
    assert late.ready and late.version == 3
    assert weights_hash(other.model) == seen[3] == weights_hash(tiny_llama.model)


def test_follower_applies_new_heads(tiny_llama, ledger):
    follower = Replica(twin(tiny_llama), ledger).start()
    leader = Replica(tiny_llama, ledger).start()
    follower.follow(poll_interval=0.2)
    try:
        for seed in range(3):
            LedgerWriter(leader.ledger, leader).add_edits(
                [random_delta(tiny_llama, seed)], [[{}]], leader.version
            )
            deadline = time.monotonic() + 10
            while follower.version != leader.version and time.monotonic() < deadline:
                time.sleep(0.02)
            assert follower.version == leader.version
            assert weights_hash(follower.handle.model) == weights_hash(tiny_llama.model)
    finally:
        follower.stop()


def test_replica_refuses_a_version_whose_hashes_do_not_match(tiny_llama, ledger):
    bystander = twin(tiny_llama)
    good = Replica(tiny_llama, ledger).start()
    LedgerWriter(good.ledger, good).add_edits([random_delta(tiny_llama, 0)], [[{}]], 0)
    record = ledger.get(1)
    forged = dict(record.hashes)
    forged[next(iter(forged))] = "0" * 64
    ledger.commit(1, list(record.edits), {"kind": "rollback", "to": 1}, forged)
    before = weights_hash(tiny_llama.model)
    assert not good.apply(2)
    assert not good.ready and "do not match hashes" in (good.fault or "")
    assert good.version == 1 and weights_hash(tiny_llama.model) == before  # kept version 1
    late = Replica(bystander, ledger).start()
    assert not late.ready and late.version == 0


def test_replica_refuses_a_corrupt_delta(tiny_llama, ledger):
    other = twin(tiny_llama)
    leader = Replica(tiny_llama, ledger).start()
    delta = random_delta(tiny_llama, 0)
    LedgerWriter(leader.ledger, leader).add_edits([delta], [[{}]], 0)
    ledger.redis.hset(ledger.k_blobs, delta.digest(), b"not a delta")
    late = Replica(other, ledger).start()
    assert not late.ready and "unreadable" in (late.fault or "")
    assert leader.ready  # the replica that already holds the version is unaffected


@pytest.mark.parametrize("batching", [False, True], ids=["one-at-a-time", "batched"])
def test_no_torn_reads_while_versions_change(tiny_llama, ledger, batching):
    """Many threads generate while an applier switches versions as fast as it can: every
    response equals what its stamped version gives alone — one request at a time, and with
    continuous batching."""
    replica = Replica(tiny_llama, ledger).start()
    for seed in range(4):
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(tiny_llama, seed)], [[{}]], replica.version
        )
    prompts = ["The Eiffel Tower is located in", "Rome is the capital of", "Big Ben is in"]
    sampling = Sampling(max_new_tokens=8)
    expected = {}
    for v in range(5):
        replica.apply(v)
        for p in prompts:
            expected[v, p] = generate(replica, p, sampling).text
    assert len({expected[v, prompts[0]] for v in range(5)}) >= 3  # versions really differ
    if batching:
        replica.batcher = Batcher(replica).start()

    stop, responses, applies, errors = threading.Event(), [], [0], []

    def one(i: int) -> None:
        p = prompts[i % len(prompts)]
        out = generate(replica, p, sampling)
        responses.append((out.version, p, out.text, out.restarts))

    def several(_: int) -> None:  # the OpenAI API's prompt lists and n: one version for all
        outs = complete(replica, prompts, [sampling] * len(prompts))
        assert len({o.version for o in outs}) == 1
        responses.extend(
            (o.version, p, o.text, o.restarts) for o, p in zip(outs, prompts, strict=True)
        )

    def streamed(_: int) -> None:  # the HTTP stream: pinned from its first step to its last
        texts, versions = ["", "", ""], set()
        for index, event in stream_all(replica, prompts, [sampling] * len(prompts)):
            texts[index] += event.text
            versions.add(event.version)
        assert len(versions) == 1
        (version,) = versions
        responses.extend((version, p, t, 0) for t, p in zip(texts, prompts, strict=True))

    def client(i: int) -> None:
        kind = (one, one, several, streamed)[i]
        while not stop.is_set():
            try:
                kind(i)
            except Exception as err:  # surfaced below
                errors.append(err)
                return

    def applier() -> None:
        v = 0
        while not stop.is_set():
            v = (v + 1) % 5
            replica.apply(v)
            applies[0] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=applier))
    for t in threads:
        t.start()
    # Enough interleaving to mean something: at least 50 applies and 50 responses, at least 8 s
    # (a slow or busy machine gets more time, up to a minute, rather than a failure).
    began = time.monotonic()
    while time.monotonic() - began < 60 and not errors:
        time.sleep(0.5)
        if time.monotonic() - began >= 8.0 and applies[0] >= 50 and len(responses) >= 50:
            break
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert applies[0] >= 50 and len(responses) >= 50, (applies, len(responses))
    assert len({v for v, *_ in responses}) == 5
    if batching:  # each request keeps its version to the end: nothing restarts
        assert not any(r for *_, r in responses)
    else:  # some requests did straddle an apply and restarted
        assert any(r for *_, r in responses)
        assert max(r for *_, r in responses) <= MAX_RESTARTS
    torn = [(v, p, text) for v, p, text, _ in responses if text != expected[v, p]]
    assert not torn, torn[:3]
    if batching:
        replica.batcher.stop()
        assert replica.batcher.largest_batch >= 2


def test_generate_matches_transformers_greedy(tiny, ledger):
    tiny_llama = tiny  # every family
    replica = Replica(tiny_llama, ledger).start()
    prompt = "The Eiffel Tower is located in"
    out = generate(replica, prompt, Sampling(max_new_tokens=10))
    ids = tiny_llama.tokenizer(prompt, return_tensors="pt")
    ref = tiny_llama.model.generate(**ids, max_new_tokens=10, do_sample=False)
    ref_text = tiny_llama.tokenizer.decode(
        ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert out.text == ref_text and out.version == 0
    assert out.prompt_tokens == ids["input_ids"].shape[1]


def test_sampling_is_seeded_and_stop_strings_cut(tiny_llama, ledger):
    replica = Replica(tiny_llama, ledger).start()
    p = "Rome is the capital of"
    hot = Sampling(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a, b = generate(replica, p, hot), generate(replica, p, hot)
    assert a.text == b.text
    others = {generate(replica, p, Sampling(**{**hot.__dict__, "seed": s})).text for s in range(6)}
    assert len(others) > 1
    full = generate(replica, p, Sampling(max_new_tokens=12)).text
    stop = full[3:5]
    cut = generate(replica, p, Sampling(max_new_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    streamed = "".join(e.text for e in stream(replica, p, Sampling(max_new_tokens=12)))
    assert streamed == full


def test_score_is_the_sum_of_token_logprobs(tiny_llama, ledger):
    replica = Replica(tiny_llama, ledger).start()
    s = score(replica, "The Eiffel Tower is located in", " Paris")
    ids = tiny_llama.tokenizer("The Eiffel Tower is located in Paris")["input_ids"]
    n = len(tiny_llama.tokenizer("The Eiffel Tower is located in")["input_ids"])
    with torch.no_grad():
        inputs = torch.tensor([ids], device=tiny_llama.device)
        logits = tiny_llama.model(input_ids=inputs).logits[0].float()
    manual = sum(float(torch.log_softmax(logits[i - 1], -1)[ids[i]]) for i in range(n, len(ids)))
    assert s.logprob == pytest.approx(manual, abs=1e-5) and s.version == 0
    assert "".join(s.tokens) == " Paris"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Sampling(**kwargs)


def test_bad_prompts_name_the_field(tiny_llama, ledger):
    replica = Replica(tiny_llama, ledger).start()
    with pytest.raises(ValueError, match=r"^prompt:"):
        generate(replica, "")
    with pytest.raises(ValueError, match=r"^continuation:"):
        score(replica, "x", "")


def test_rwlock_prefers_a_waiting_writer():
    lock, order = RWLock(), []
    reader_in = threading.Event()

    def long_reader() -> None:
        with lock.read():
            reader_in.set()
            time.sleep(0.3)
            order.append("reader1 out")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("reader2")

    t1 = threading.Thread(target=long_reader)
    t1.start()
    reader_in.wait()
    t2 = threading.Thread(target=writer)
    t2.start()
    time.sleep(0.05)  # the writer is now waiting for reader 1
    t3 = threading.Thread(target=late_reader)
    t3.start()
    for t in (t1, t2, t3):
        t.join()
    assert order == ["reader1 out", "writer", "reader2"]


def test_ledger_fixture_is_isolated(ledger: Ledger):
    assert ledger.redis.get(ledger.k_head) is None


def test_a_replica_refuses_to_start_on_edited_weights(tiny_llama, ledger):
    """A model copied from a live, edited replica is not a base: starting on it would take
    edited tensors for base tensors and materialise every later version wrongly."""
    apply_delta(tiny_llama, random_delta(tiny_llama, 0))
    with pytest.raises(LedgerMismatchError, match="must start from unedited weights"):
        Replica(tiny_llama, ledger).start()


def test_non_finite_delta_is_refused_before_commit(tiny_llama, ledger):
    replica = Replica(tiny_llama, ledger).start()
    delta = random_delta(tiny_llama, 0)
    path = next(iter(delta.factors))
    left, right = delta.factors[path]
    left = left.clone()
    left[0, 0] = float("nan")
    delta.factors[path] = (left, right)
    with pytest.raises(ValueError, match="non-finite"):
        LedgerWriter(replica.ledger, replica).add_edits([delta], [[{}]], 0)
    assert ledger.head() == 0 and ledger.redis.hlen(ledger.k_blobs) == 0


def test_a_commit_materialises_once_and_a_rollback_needs_no_model(tiny_llama, ledger, monkeypatch):
    """The writer hashes the new edit list on the replica, and the replica's apply copies those
    same tensors (one materialisation per commit); a writer without a model rolls back with
    the target version's hashes and the recorded base hashes, and the replica serves it."""
    import factpatch.runtime.replica as replica_module

    replica = Replica(tiny_llama, ledger).start()
    writer = LedgerWriter(ledger, replica)
    calls: list[int] = []
    real = replica_module.materialize

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(replica_module, "materialize", counted)
    writer.add_edits([random_delta(tiny_llama, 0)], [[{}]], 0)  # first touch: base hash too
    first = len(calls)
    same_module = random_delta(tiny_llama, tiny_llama.n_layers)  # layer 0 again
    writer.add_edits([same_module], [[{}]], 1)
    assert len(calls) - first == 1 and replica.version == 2
    edited = weights_hash(tiny_llama.model)
    assert set(ledger.base_hashes()) == set(ledger.get(2).hashes)

    back = LedgerWriter(ledger).rollback(0).version  # no replica, no model
    assert back.edits == () and back.hashes == ledger.base_hashes()
    assert replica.catch_up() == 3 and weights_hash(tiny_llama.model) == tiny_llama.base_hash
    again = LedgerWriter(ledger).rollback(2).version
    assert again.hashes == ledger.get(2).hashes
    assert replica.catch_up() == 4 and weights_hash(tiny_llama.model) == edited
    with pytest.raises(LedgerError, match="needs the model"):
        LedgerWriter(ledger).revert(again.edits[0])
    assert ledger.head() == 4
