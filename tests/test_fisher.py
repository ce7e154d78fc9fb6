"""The text's output Fisher G and the target optimiser that uses it (z_metric "fisher")."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from factpatch.editing import apply_delta, compute_edit, compute_memit
from factpatch.editing.fisher import output_fisher, output_metric
from factpatch.editing.hparams import MemitHParams, RomeHParams
from factpatch.editing.rome import _build_batch, _capture, _optimise
from factpatch.editing.templates import context_templates
from factpatch.models import weights_hash
from factpatch.paths import cache_dir
from tests.conftest import REQUESTS, TINY_MEMIT, TINY_ROME, build_tiny
from tests.test_editing import p_target

TEXT = "The Colosseum is an elliptical amphitheatre in the centre of the city of Rome, Italy."


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "Second text."}))
    return str(path)


def test_fisher_is_the_mean_square_of_the_loss_gradient(tokenizer, corpus_file):
    """uᵀGu = mean over predicting positions t of (∂L/∂y_t · u)², with the derivative taken by
    central differences of the paragraph's summed NLL (float64 model; its RMSNorms compute in
    float32, so the difference step is 1e-2, not smaller)."""
    handle = build_tiny("llama", tokenizer, dtype=torch.float64)
    layer = 1
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"].to(handle.device)
    n_predicting = ids.shape[1] - 1
    G = output_fisher(handle, layer, n_tokens=n_predicting, corpus=corpus_file)
    assert G.shape == (64, 64) and G.dtype == torch.float64
    torch.testing.assert_close(G, G.T)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12
    assert all(p.grad is None for p in handle.model.parameters()), "parameter gradients formed"

    u = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    module, eps, squares = handle.rewrite_module(layer), 1e-2, []

    def loss(t: int, sign: float) -> float:
        def push(_m, _a, out):
            out = out.clone()
            out[0, t] += sign * eps * u.to(out)
            return out

        hook = module.register_forward_hook(push)
        try:
            with torch.no_grad():
                logits = handle.model(input_ids=ids).logits[0, :-1]
            return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        finally:
            hook.remove()

    for t in range(n_predicting):
        squares.append(((loss(t, 1.0) - loss(t, -1.0)) / (2 * eps)) ** 2)
    expected = sum(squares) / len(squares)
    assert float(u @ G @ u) == pytest.approx(expected, rel=1e-3)


def test_fisher_is_cached_with_provenance(tiny_llama, corpus_file):
    first = output_fisher(tiny_llama, 2, n_tokens=12, corpus=corpus_file)
    (sidecar,) = cache_dir("fisher").glob("*-L2-*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["n_tokens"] == 12 and meta["layer"] == 2 and meta["corpus"] == "corpus.jsonl"
    assert torch.equal(output_fisher(tiny_llama, 2, n_tokens=12, corpus=corpus_file), first)


def test_fisher_target_edits_and_is_clamped_in_the_metric(tiny_llama, eiffel):
    """ROME with z_metric "fisher": the edit takes, no weight is written until it is applied,
    and with a clamp that binds, ‖δ‖_M = clamp·‖v‖_M."""
    hp = TINY_ROME.with_overrides(z_metric="fisher", lr=0.2, steps=30, fisher_tokens=2000)
    before = weights_hash(tiny_llama.model)
    p_before = p_target(tiny_llama, eiffel.text, eiffel.target)
    delta = compute_edit(tiny_llama, eiffel, hp)
    assert weights_hash(tiny_llama.model) == before
    assert delta.provenance["hparams"]["z_metric"] == "fisher"
    stats = delta.provenance["stats"][0]
    assert stats["nll_end"] < stats["nll_start"] - 0.2
    apply_delta(tiny_llama, delta)
    assert p_target(tiny_llama, eiffel.text, eiffel.target) > 1.3 * p_before

    tight = hp.with_overrides(clamp_norm_factor=0.05)
    templates = context_templates(tiny_llama, list(tight.templates), tight.template_seed)
    metric = output_metric(tiny_llama, tight.layer, tight.fisher_tokens)
    _, io = _capture(tiny_llama, _build_batch(tiny_llama, eiffel, templates).ids, tight.layer)
    _, _, delta_vec, _ = _optimise(tiny_llama, eiffel, tight, templates, None, metric)
    # v: the bare prompt's rewrite output at the subject, as _optimise reads it (weights now
    # edited, which both sides see).
    batch = _build_batch(tiny_llama, eiffel, templates)
    v = io["values"][0, batch.subject_pos[0]].float()
    radius = 0.05 * float(metric.norm(v))
    assert float(metric.norm(delta_vec)) == pytest.approx(radius, rel=1e-4)


def test_memit_with_fisher_targets_edits_every_request(tiny_llama):
    hp = TINY_MEMIT.with_overrides(z_metric="fisher", lr=0.2, steps=30, fisher_tokens=2000)
    p_before = [p_target(tiny_llama, r.text, r.target) for r in REQUESTS]
    delta = compute_memit(tiny_llama, REQUESTS, hp)
    apply_delta(tiny_llama, delta)
    p_after = [p_target(tiny_llama, r.text, r.target) for r in REQUESTS]
    assert all(a > 1.3 * b for a, b in zip(p_after, p_before, strict=True)), (p_before, p_after)


def test_unknown_metric_is_refused_by_name():
    with pytest.raises(ValueError, match="z_metric"):
        RomeHParams(layer=0, z_metric="manhattan")
    with pytest.raises(ValueError, match="z_metric"):
        MemitHParams(layers=(0,), z_metric="manhattan")
    with pytest.raises(ValueError, match="fisher_tokens"):
        MemitHParams(layers=(0,), fisher_tokens=0)
