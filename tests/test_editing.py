"""ROME on tiny random models of every family: maths, purity, rank, guard, determinism."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from factpatch.editing import (
    DegenerateEditError,
    EditRequest,
    apply_delta,
    base_weights,
    compute_edit,
    load_weights,
    materialize,
)
from factpatch.editing.keys import capture
from factpatch.editing.prompts import continuation_logprobs
from factpatch.editing.targets import run_blocks
from factpatch.models import weights_hash


def p_target(handle, prompt: str, target: str) -> float:
    return math.exp(
        continuation_logprobs(handle.model, handle.tokenizer, [(prompt, target)], handle.device)[0]
    )


def all_hooks(handle) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())


def test_upper_blocks_reproduce_the_full_forward(tiny):
    """The speed path (capture once, rerun only the blocks from the edited layer up, head at
    chosen positions) must give the model's own logits."""
    ids = tiny.tokenizer(["The Eiffel Tower is located in"], return_tensors="pt")["input_ids"]
    for layer in (0, 2):
        captured, _ = capture(tiny, ids, layer)
        hidden = run_blocks(tiny.module(tiny.adapter.blocks), captured, range(layer, 4))
        logits = tiny.logits(hidden[0])
        torch.testing.assert_close(logits, tiny.model(input_ids=ids).logits[0])
    assert all_hooks(tiny) == 0


def test_compute_edit_is_pure_rank_one_and_effective(tiny, tiny_hparams, eiffel):
    before_hash = weights_hash(tiny.model)
    p_before = p_target(tiny, eiffel.text, eiffel.target)
    delta = compute_edit(tiny, eiffel, tiny_hparams)
    assert weights_hash(tiny.model) == before_hash, "compute_edit changed the weights"
    assert all_hooks(tiny) == 0, "compute_edit left a hook behind"
    (path,) = delta.factors
    assert path == tiny.adapter.rewrite_path(tiny_hparams.layer)
    left, right = delta.factors[path]
    assert left.dtype == right.dtype == torch.float32
    assert delta.rank(path) == 1
    apply_delta(tiny, delta)
    p_after = p_target(tiny, eiffel.text, eiffel.target)
    stats = delta.provenance["stats"][0]
    assert stats["nll_end"] < stats["nll_start"] - 0.2
    assert p_after > 1.3 * p_before, (p_before, p_after)


def test_inserted_pair_holds_exactly(tiny_llama, tiny_hparams, eiffel):
    """After the update, W' k̄ = W k̄ + δ (ROME eq. 2 with the r-ROME key)."""
    from factpatch.editing.targets import build_loss_batch, optimise_target
    from factpatch.editing.templates import context_templates

    templates = context_templates(tiny_llama, list(tiny_hparams.templates), 0)
    key, _, delta_vec, _ = optimise_target(tiny_llama, eiffel, tiny_hparams, templates, None)
    delta = compute_edit(tiny_llama, eiffel, tiny_hparams)
    w = tiny_llama.rewrite_weight(tiny_hparams.layer).float()
    (path,) = delta.factors
    w_new = w + delta.dense(path)
    torch.testing.assert_close(w_new @ key, w @ key + delta_vec, atol=1e-4, rtol=1e-4)
    assert build_loss_batch  # the batch builder is exercised by optimise_target


def test_same_seed_same_delta(tiny_llama, tiny_hparams, eiffel):
    a = compute_edit(tiny_llama, eiffel, tiny_hparams)
    b = compute_edit(tiny_llama, eiffel, tiny_hparams)
    for path in a.factors:
        assert torch.equal(a.factors[path][0], b.factors[path][0])
        assert torch.equal(a.factors[path][1], b.factors[path][1])


def test_full_passes_give_the_packed_passes_update(tiny_llama, tiny_hparams, eiffel):
    """``packed=False`` re-runs every position in every step (the code before the packed
    passes; bench/edit_speed.py compares the two): the same update up to float rounding."""
    packed = compute_edit(tiny_llama, eiffel, tiny_hparams)
    full = compute_edit(tiny_llama, eiffel, tiny_hparams, packed=False)
    (path,) = packed.factors
    stats = (packed.provenance["stats"][0], full.provenance["stats"][0])
    assert stats[0]["positions"][1] < stats[0]["positions"][0]  # later passes were packed
    assert stats[1]["positions"][1] == stats[1]["positions"][0]  # every pass ran in full
    torch.testing.assert_close(packed.dense(path), full.dense(path), rtol=1e-4, atol=1e-6)


def test_two_requests_give_rank_two_and_both_take(tiny_llama, tiny_hparams, eiffel):
    other = EditRequest("{} is the capital of", "Rome", "Germany")
    delta = compute_edit(tiny_llama, [eiffel, other], tiny_hparams)
    (path,) = delta.factors
    assert delta.rank(path) == 2
    assert len(delta.provenance["requests"]) == 2
    p0 = [p_target(tiny_llama, r.text, r.target) for r in (eiffel, other)]
    apply_delta(tiny_llama, delta)
    p1 = [p_target(tiny_llama, r.text, r.target) for r in (eiffel, other)]
    assert p1[0] > 1.3 * p0[0] and p1[1] > 1.3 * p0[1], (p0, p1)


def test_guard_refuses_an_exploding_update(tiny_llama, tiny_hparams, eiffel):
    before = weights_hash(tiny_llama.model)
    with pytest.raises(DegenerateEditError, match="‖ΔW‖/‖W‖"):
        compute_edit(tiny_llama, eiffel, tiny_hparams.with_overrides(max_update_ratio=1e-6))
    with pytest.raises(DegenerateEditError, match="denominator"):
        compute_edit(
            tiny_llama,
            eiffel,
            tiny_hparams.with_overrides(key_mode="original", min_denominator_ratio=1e9),
        )
    assert weights_hash(tiny_llama.model) == before
    assert all_hooks(tiny_llama) == 0


def test_original_key_mode_differs_only_in_the_denominator(tiny_llama, tiny_hparams, eiffel):
    averaged = compute_edit(tiny_llama, eiffel, tiny_hparams)
    original = compute_edit(tiny_llama, eiffel, tiny_hparams.with_overrides(key_mode="original"))
    (path,) = averaged.factors
    ratio = original.provenance["stats"][0]["denominator_ratio"]
    assert averaged.provenance["stats"][0]["denominator_ratio"] == 1.0
    torch.testing.assert_close(averaged.factors[path][1], original.factors[path][1])
    torch.testing.assert_close(original.factors[path][0] * ratio, averaged.factors[path][0])


def test_other_threads_never_see_the_edit_in_progress(tiny_llama, tiny_hparams, eiffel):
    ids = tiny_llama.tokenizer([eiffel.text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = tiny_llama.model(input_ids=ids).logits
    seen, stop = [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with torch.no_grad():
                seen.append(torch.equal(tiny_llama.model(input_ids=ids).logits, reference))

    server = threading.Thread(target=serve)
    server.start()
    try:
        compute_edit(tiny_llama, eiffel, tiny_hparams)
    finally:
        stop.set()
        server.join()
    assert len(seen) > 3 and all(seen)


def test_materialize_is_exact_and_order_fixed(tiny_llama, tiny_hparams, eiffel):
    other = EditRequest("{} is the capital of", "Rome", "Germany")
    d1 = compute_edit(tiny_llama, eiffel, tiny_hparams)
    d2 = compute_edit(tiny_llama, other, tiny_hparams)
    path = next(iter(d1.factors))
    base = base_weights(tiny_llama, [path])
    original = weights_hash(tiny_llama.model)
    load_weights(tiny_llama, materialize(tiny_llama, base, [d1, d2]))
    edited = weights_hash(tiny_llama.model)
    assert edited != original
    load_weights(tiny_llama, materialize(tiny_llama, base, []))  # back to the base
    assert weights_hash(tiny_llama.model) == original
    load_weights(tiny_llama, materialize(tiny_llama, base, [d1, d2]))
    assert weights_hash(tiny_llama.model) == edited


def test_delta_save_load_round_trip(tiny_llama, tiny_hparams, eiffel, tmp_path):
    delta = compute_edit(tiny_llama, eiffel, tiny_hparams)
    delta.save(tmp_path)
    loaded = type(delta).load(tmp_path)
    for path in delta.factors:
        assert torch.equal(delta.factors[path][0], loaded.factors[path][0])
        assert torch.equal(delta.factors[path][1], loaded.factors[path][1])
    assert loaded.provenance["requests"][0]["target"] == "Rome"
    assert loaded.provenance["model_hash"] == tiny_llama.base_hash


def test_layer_out_of_range_is_refused(tiny_llama, tiny_hparams, eiffel):
    with pytest.raises(ValueError, match="layer"):
        compute_edit(tiny_llama, eiffel, tiny_hparams.with_overrides(layer=99))


def _targets_most_probable(handle, request, hp, templates, delta_vec) -> bool:
    """Whether, with δ added at the subject's last token, every target token is the most
    probable one at its position in every prefixed prompt."""
    from factpatch.editing.targets import build_loss_batch
    from factpatch.models.hooks import thread_hooks

    batch = build_loss_batch(handle, request, templates)
    captured, _ = capture(handle, batch.ids, hp.layer)
    rows = torch.arange(batch.ids.shape[0])

    def add(_module, _args, output):
        out = output.clone()
        out[rows, batch.subject_pos] += delta_vec.to(out.dtype)
        return out

    blocks, upper = handle.module(handle.adapter.blocks), range(hp.layer, handle.n_layers)
    with torch.no_grad(), thread_hooks(forward=[(handle.rewrite_module(hp.layer), add)]):
        hidden = run_blocks(blocks, captured, upper)
    logits = handle.logits(hidden[batch.nll_rows, batch.nll_pos])
    return bool((logits.argmax(-1) == batch.nll_ids).all())


def test_most_probable_early_stopping_stops_at_the_first_step_that_makes_every_target_top(
    tiny_llama, tiny_hparams
):
    """MPES (Gupta et al. 2025): with the NLL stop off, the optimisation ends at the first step
    after which the target is the top token in every prompt — not before, not later."""
    from factpatch.editing.targets import optimise_target
    from factpatch.editing.templates import context_templates

    # The subject ends the prompt and the target is one token: a random tiny model's later
    # positions barely feel δ, so only there can the target become the top token.
    request = EditRequest("Tourists come to see {}", "the Eiffel Tower in", "Paris")
    hp = tiny_hparams.with_overrides(steps=60, early_stop_loss=0.0)
    templates = context_templates(tiny_llama, list(hp.templates), 0)
    mpes = hp.with_overrides(early_stop_most_probable=True)
    *_, delta_vec, stats = optimise_target(tiny_llama, request, mpes, templates, None)
    *_, _, full = optimise_target(tiny_llama, request, hp, templates, None)
    assert full.steps == 59 and 0 < stats.steps < 59  # 60 passes: at most 59 updates
    assert _targets_most_probable(tiny_llama, request, hp, templates, delta_vec)
    earlier = hp.with_overrides(steps=stats.steps)  # one update fewer
    *_, before, _ = optimise_target(tiny_llama, request, earlier, templates, None)
    assert not _targets_most_probable(tiny_llama, request, hp, templates, before)
