"""Experiment record: protect the text in the metric its loss feels, on both sides of W.

MEMIT's preserved term λ‖ΔW C^½‖² = λ·E_text‖ΔW k‖² counts every direction of the layer's
output alike.  What the text's loss feels of a change Δy at the layer's output is, to second
order, ½·Δyᵀ F Δy with F the Fisher of the next-token distribution at that output; the
Kronecker-factored approximation of the weight's Fisher, E[g gᵀ ⊗ k kᵀ] ≈ A ⊗ C with
A = E[g gᵀ] over the output gradients g = ∂ℓ/∂y (K-FAC, Martens & Grosse 2015; used for
weight surgery by van der Ouderaa et al. 2024, "The LLM Surgeon", ICLR), gives the preserved term
λ·tr(Ā ΔW C ΔWᵀ), Ā = A^p scaled to mean eigenvalue 1 (p = 0: MEMIT; p = 1: K-FAC).  Batch b of
a recorded sequential run is re-solved (float64) as

    min_Δ  λ·tr(Ā Δ C Δᵀ) + μ‖Δ K_p‖² + ‖Δ K − R'‖²,

row by row in Ā's eigenbasis (Ā = U diag(a) Uᵀ, Δ̃ = UᵀΔ, R̃ = UᵀR'):
δ̃ᵢ = (λ aᵢ C + M)⁻¹ K r̃ᵢ with M = μ K_pK_pᵀ + K Kᵀ, all rows at once through the generalised
eigenvectors of (M, C): with C = L Lᵀ and L⁻¹ M L⁻ᵀ = V diag(m) Vᵀ,
(λ aᵢ C + M)⁻¹ = L⁻ᵀ V diag(1 / (λ aᵢ + m)) Vᵀ L⁻¹.  The targets are the run's (as in
research.memit_replay, whose replay loop runs this solve).  A grid point's
``grad_cov`` β replaces C by (1 − β)·C + β·C_g, C_g = E[‖g‖² k kᵀ] / E[‖g‖²] from the Fisher
sample scaled to C's trace: the input side of the exact per-token Fisher E[(gᵀΔW k)²], which
K-FAC's independence assumption (A ⊗ C) misses.  A fifth argument n > 0 also accumulates A and
C_g over n tokens of the paragraphs between C's and the sample's (its sums alone, cached beside
the run); a point's ``"big": true`` solves with those instead of the sample's.

F is estimated with labels sampled from the model (the true Fisher, not the empirical one) on
corpus paragraphs that are neither C's nor the held-back ones; each token's g includes the
later positions' losses.  For every grid point the script also reports ½·E_t[(g_tᵀ ΔW k_t)²],
the second-order prediction of the change in mean NLL per token, beside the measured one.

    python -m research.experiments.output_fisher results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 \\
        '[{"lam": 75, "power": 0}, {"lam": 75, "power": 1}]'

One JSON line per grid point on stdout.  Results: research/NOTES.md.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

from factpatch.corpus import load_corpus
from factpatch.editing import base_weights, load_weights
from factpatch.editing.prompts import pad_batch
from factpatch.evaluation.counterfact import summarise
from factpatch.evaluation.sequential import (
    heldout_paragraphs,
    measure_records,
    perplexity,
    run_paragraphs,
)
from factpatch.models.loading import ModelHandle, load_model
from research.memit_replay import open_run, replay, run_covariance


def _gradients(handle: ModelHandle, layer: int, texts: list[str], seed: int = 0):
    """Per paragraph: keys k_t [n, in] and output gradients g_t [n, out] (float32, on the
    model's device) at the rewrite module of ``layer``, labels drawn from the model's own
    next-token distribution."""
    module = handle.module(handle.adapter.rewrite_path(layer))
    tok, device = handle.tokenizer, handle.device
    gen = torch.Generator(device=device).manual_seed(seed)
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, inputs, output):
        seen["k"] = inputs[0].detach()
        seen["y"] = output.detach().requires_grad_(True)  # the graph starts here
        return seen["y"]

    hooked = module.register_forward_hook(hook)
    try:
        for text in texts:
            ids = tok(text, truncation=True, max_length=128)["input_ids"]
            if len(ids) < 2:
                continue
            batch = pad_batch([ids], tok.pad_token_id, device)
            logits = handle.model(input_ids=batch).logits[0, :-1].float()  # [n−1, V]
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, seen["y"])
            # positions with a loss at or after them
            yield seen["k"][0, :-1].float(), grad[0, :-1].float()
    finally:
        hooked.remove()


def sample_gradients(
    handle: ModelHandle, layer: int, texts: list[str], n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_tokens`` keys [N, in] and output gradients [N, out], on the CPU."""
    keys, grads, count = [], [], 0
    for k, g in _gradients(handle, layer, texts):
        keys.append(k.cpu())
        grads.append(g.cpu())
        count += len(k)
        if count >= n_tokens:
            break
    return torch.cat(keys)[:n_tokens], torch.cat(grads)[:n_tokens]


def gradient_stats(
    handle: ModelHandle, layer: int, texts: list[str], n_tokens: int
) -> dict[str, torch.Tensor]:
    """A = E[g gᵀ] and C_g = E[‖g‖² k kᵀ] / E[‖g‖²] (float64, CPU) over ``n_tokens`` tokens,
    accumulated paragraph by paragraph in corpus order."""
    fisher = gram = None
    weight, count = 0.0, 0
    for k, g in _gradients(handle, layer, texts, seed=1):
        k, g = k[: n_tokens - count].double(), g[: n_tokens - count].double()
        norms = g.pow(2).sum(-1)
        part_f, part_g = g.T @ g, (k * norms[:, None]).T @ k
        fisher = part_f if fisher is None else fisher + part_f
        gram = part_g if gram is None else gram + part_g
        weight, count = weight + float(norms.sum()), count + len(k)
        if count >= n_tokens:
            break
    return {"A": (fisher / count).cpu(), "C_g": (gram / weight).cpu(), "n": torch.tensor(count)}


def output_metric(fisher: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā's eigenvalues a (mean 1) and eigenvectors U, for A (``fisher``) raised to ``power``."""
    eigvals, eigvecs = torch.linalg.eigh(fisher)
    a = eigvals.clamp(min=eigvals.max() * 1e-12) ** power
    return a / a.mean(), eigvecs


def kron_solve(lam: float, cov: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """A batch solve for ``memit_replay.replay``: min λ·tr(Ā Δ C Δᵀ) + tr(Δ M Δᵀ) − 2 tr(Δ K R'),
    row by row in Ā's eigenbasis (module docstring); returns the update [out, in]."""
    chol = torch.linalg.cholesky(cov.double())  # C = L Lᵀ
    a, u = a.to(chol.device), u.to(chol.device)

    def solve(resid: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        linv_m = torch.linalg.solve_triangular(chol, kept, upper=False)  # L⁻¹ M
        m, V = torch.linalg.eigh(torch.linalg.solve_triangular(chol, linv_m.T, upper=False))
        proj = V.T @ torch.linalg.solve_triangular(chol, K, upper=False)  # Vᵀ L⁻¹ K: [in, B]
        q = (proj @ resid @ u) / (lam * a[None, :] + m[:, None])  # [in, out] in Ā's basis
        upd_t = torch.linalg.solve_triangular(chol.T, V @ q, upper=True)  # Δ̃ᵀ: [in, out]
        return u @ upd_t.T

    return solve


def gradient_weighted_cov(keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """C_g = E[‖g‖² k kᵀ] / E[‖g‖²] (float64): the input side of the exact per-token Fisher
    E[(gᵀ ΔW k)²] when the output side is taken as isotropic; each token's key weighted by how
    much its prediction responds to the layer's output."""
    weight = grads.double().pow(2).sum(-1)  # [N]
    keys = keys.double()
    return (keys * weight[:, None]).T @ keys / weight.sum()


def main(
    run: str, data: str, batches: int, grid: list[dict], n_fisher: int = 16384, n_big: int = 0
) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer = report["layers"][0]
    path = handle.adapter.rewrite_path(layer)
    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    texts = load_corpus(None).texts
    store = Path(run) / f"fisher-L{layer}-{n_fisher}.pt"
    if store.is_file():
        keys, grads = torch.load(store)
    else:
        t0 = time.perf_counter()
        pool = list(texts[len(texts) - len(held) - 1000 : len(texts) - len(held)])
        keys, grads = sample_gradients(handle, layer, pool, n_fisher)
        torch.save((keys, grads), store)
        print(json.dumps({"fisher_tokens": len(keys), "seconds": time.perf_counter() - t0}))
    small = {"A": grads.double().T @ grads.double() / len(grads)}
    small["C_g"] = gradient_weighted_cov(keys, grads)
    big = small
    if n_big:  # a larger sample for the metric alone, from paragraphs after C's
        big_store = Path(run) / f"fisher-stats-L{layer}-{n_big}.pt"
        if not big_store.is_file():
            t0 = time.perf_counter()
            pool = list(texts[1000 : len(texts) - len(held) - 1000])
            torch.save(gradient_stats(handle, layer, pool, n_big), big_store)
            print(json.dumps({"fisher_stats_tokens": n_big, "seconds": time.perf_counter() - t0}))
        big = torch.load(big_store)
    base = base_weights(handle, [path])
    weight0 = base[path].double()
    cov = run_covariance(handle, report)
    lam0 = report["hparams"]["mom2_update_weight"]
    for point in grid:
        t0 = time.perf_counter()
        stats = big if point.get("big") else small
        a, u = output_metric(stats["A"], point["power"])
        solve_cov = cov
        if point.get("grad_cov"):  # C blended with C_g (scaled to C's trace) by β
            beta, cov_g = point["grad_cov"], stats["C_g"].to(cov.device)
            solve_cov = (1 - beta) * cov + beta * cov_g * (cov.trace() / cov_g.trace())
        solve = kron_solve(point["lam"], solve_cov.to(handle.device), a, u)
        weight = replay(handle, report, deltas, records, point["lam"], cov=solve_cov, solve=solve)[
            -1
        ]
        change = (weight - weight0.to(weight.device)).cpu()
        pred = 0.0
        for first in range(0, len(keys), 2048):
            k, g = keys[first : first + 2048].double(), grads[first : first + 2048].double()
            pred += float(((g @ change) * k).sum(-1).pow(2).sum())
        if point.get("predict_only"):  # the prediction alone, for a point measured before
            print(json.dumps({**point, "predicted_dnll": 0.5 * pred / len(keys)}), flush=True)
            continue
        load_weights(handle, {path: weight})
        ppl = perplexity(handle, held)
        line = {
            **point,
            "n_edits": len(records),
            "wear": float(torch.trace(change @ cov.cpu() @ change.T)),
            "rank": int(torch.linalg.matrix_rank(change.float())),
            "predicted_dnll": 0.5 * pred / len(keys),
            "measured_dnll": math.log(ppl / report["unedited_perplexity"]),
            "perplexity": ppl,
            "unedited_perplexity": report["unedited_perplexity"],
            "a_max": float(a.max()),
            "a_median": float(a.median()),
            **summarise(measure_records(handle, records)),
            "seconds": round(time.perf_counter() - t0, 1),
            "lam_run": lam0,
        }
        load_weights(handle, base)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), *map(int, sys.argv[5:])
    )
