"""Key-gated edits on a tiny random model: open everywhere it is the ungated edit; a key far
from every edit gets the unedited output bit for bit; the edits still take effect; the block
leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch

from factpatch.editing import base_weights, compute_memit, load_weights, materialize
from factpatch.editing.covariance import layer_covariances
from factpatch.editing.gate import KeyGate, gated
from factpatch.ledger.writer import LedgerWriter
from factpatch.models import weights_hash
from tests.conftest import REQUESTS
from tests.test_memit import all_hooks, p_target

UNRELATED = "The committee met on Tuesday to discuss the budget for next year."


@pytest.fixture
def edited(tiny_llama, memit_hparams):
    hp = memit_hparams.with_overrides(layers=(1,))
    delta = compute_memit(tiny_llama, REQUESTS, hp)
    (path,) = delta.factors
    cov = layer_covariances(tiny_llama, [1], hp.cov_tokens)[1].cov
    base = base_weights(tiny_llama, [path])
    return tiny_llama, delta, path, {path: cov}, base


@torch.no_grad()
def logits(handle, text: str) -> torch.Tensor:
    ids = handle.tokenizer(text, return_tensors="pt").to(handle.device)
    return handle.model(**ids).logits[0]


def test_a_gate_open_everywhere_is_the_ungated_edit(edited):
    handle, delta, _, covs, base = edited
    load_weights(handle, materialize(handle, base, [delta]))
    ungated = [logits(handle, r.text) for r in REQUESTS] + [logits(handle, UNRELATED)]
    load_weights(handle, base)
    with gated(handle, base, [delta], covs, threshold=-2.0):
        through = [logits(handle, r.text) for r in REQUESTS] + [logits(handle, UNRELATED)]
    for a, b in zip(ungated, through, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_edited_keys_pass_and_a_far_key_gets_the_unedited_output(edited):
    handle, delta, path, covs, base = edited
    unedited = logits(handle, UNRELATED)
    before = [p_target(handle, r) for r in REQUESTS]
    with gated(handle, base, [delta], covs, threshold=0.4) as gates:
        gate: KeyGate = gates[path]
        keys = delta.keys[path].T.to(gate.change)  # [B, in]
        assert (gate.scores(keys) > 0.999).all()  # each fact's own key: cosine 1
        module = handle.module(path)
        torch.testing.assert_close(
            gate(module, (keys,), keys @ base[path].T.to(keys)),
            keys @ (base[path].to(keys) + delta.dense(path).to(keys)).T,
        )
        scores: list[torch.Tensor] = []
        probe = module.register_forward_hook(lambda m, a, o: scores.append(gate.scores(a[0])))
        far = logits(handle, UNRELATED)
        probe.remove()
        assert float(torch.cat(scores, 1).max()) <= 0.4, "precondition: no key of the text passes"
        assert torch.equal(far, unedited)
        after = [p_target(handle, r) for r in REQUESTS]
    # Every edit takes effect through the gate (on this random model by 1.2–2.6×: how much of
    # the ungated 1.8–9× passes depends on the keys' whitened cosines, i.e. on C's sample).
    for b, a in zip(before, after, strict=True):
        assert a > 1.15 * b, (before, after)


def test_the_block_restores_the_weights_and_removes_its_hooks(edited):
    handle, delta, path, covs, base = edited
    load_weights(handle, materialize(handle, base, [delta]))  # enter holding the edit
    entry, hooks = weights_hash(handle.model), all_hooks(handle)
    with gated(handle, base, [delta], covs, threshold=0.5):
        assert torch.equal(handle.module(path).weight, base[path])
        assert all_hooks(handle) == hooks + 1
    assert weights_hash(handle.model) == entry and all_hooks(handle) == hooks


def test_a_sequential_run_measured_through_an_open_gate_matches_the_ungated_one(
    tiny_llama, memit_hparams, tmp_path
):
    """The gate changes what is measured, never what is computed: open everywhere it scores the
    run as the ungated model does; a checkpoint measured one way is not resumed the other."""
    from factpatch.evaluation.sequential import evaluate_sequential
    from tests.conftest import val_sample

    records = val_sample()[:4]
    hp = memit_hparams.with_overrides(steps=2, prior_weight=1.0)
    options = dict(batch=2, fluency_prompts=2, fluency_tokens=5, ppl_paragraphs=2, progress=False)
    before = weights_hash(tiny_llama.model)
    plain = evaluate_sequential(tiny_llama, records, "memit", hp, **options)
    run = tmp_path / "gated"
    first = evaluate_sequential(
        tiny_llama, records, "memit", hp, checkpoint=run, max_batches=1, gate=-2.0, **options
    )
    assert first["restored"] and first["gate_threshold"] == -2.0
    with pytest.raises(ValueError, match=r"measured with gate -2\.0, not None"):
        evaluate_sequential(tiny_llama, records, "memit", hp, checkpoint=run, **options)
    through = evaluate_sequential(
        tiny_llama, records, "memit", hp, checkpoint=run, gate=-2.0, **options
    )
    assert through["restored"] and weights_hash(tiny_llama.model) == before
    for a, b in zip(plain["curve"], through["curve"], strict=True):
        for key in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5)
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    # Scored again from its checkpoint, the gated run gives back every recorded figure.
    from research.remeasure import remeasure_gated
    from tests.conftest import DATA

    again = remeasure_gated(tiny_llama, run, DATA / "counterfact_val_sample.json", -2.0)
    assert weights_hash(tiny_llama.model) == before
    for a, b in zip(through["curve"], again["curve"], strict=True):
        for key in ("n_edits", "efficacy", "paraphrase", "neighborhood", "perplexity", "fluency"):
            assert a[key] == b[key], key


def test_a_gated_replica_serves_the_ledger_behind_gates_and_rolls_back_exactly(
    tiny_llama, tiny_hparams, ledger
):
    """Two replicas follow one ledger, one in the weights and one behind key gates (τ 0.4): the
    gated one keeps its base tensors, its edits take effect, a text far from them is answered
    as by the unedited model, and after a rollback every output is the unedited model's."""
    import math

    from factpatch.runtime import Replica, score
    from tests.test_runtime import rome_edits, twin

    served = twin(tiny_llama)
    base_hash = weights_hash(served.model)
    prompt = "The Eiffel Tower is located in the city of"
    unedited_far, unedited_prompt = logits(served, UNRELATED), logits(served, prompt)
    writer = Replica(tiny_llama, ledger).start()
    gated_replica = Replica(served, ledger, gate=0.4).start()
    p_before = math.exp(score(gated_replica, prompt, " Rome").logprob)
    rome_edits(writer, tiny_hparams, 2)
    assert gated_replica.catch_up() == 2 and gated_replica.ready
    assert weights_hash(served.model) == base_hash  # the edits live in the gates
    assert math.exp(score(gated_replica, prompt, " Rome").logprob) > 1.3 * p_before
    (path,) = gated_replica._slots
    gate = gated_replica._slots[path].gate
    scores: list[torch.Tensor] = []
    probe = served.module(path).register_forward_hook(
        lambda m, a, o: scores.append(gate.scores(a[0]))
    )
    far = logits(served, UNRELATED)
    probe.remove()
    assert float(torch.cat(scores, 1).max()) <= 0.4, "precondition: no key of the text passes"
    assert torch.equal(far, unedited_far)
    LedgerWriter(writer.ledger, writer).rollback(0)
    assert gated_replica.catch_up() == 3 and gated_replica._slots[path].gate is None
    assert torch.equal(logits(served, prompt), unedited_prompt)
    assert weights_hash(served.model) == base_hash
