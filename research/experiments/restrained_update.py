"""Experiment record: restrain the largest components of a sequential run's accumulated update.

PRUNE (Ma et al., ICLR 2025, arXiv 2405.16821) bounds the perturbation of an edited matrix by
restraining the singular values of the accumulated update ΔW that exceed the largest singular
value of the unedited W.  What the text feels, though, is ΔW in the metric of its keys: the
text's mean squared change is tr(ΔW C ΔWᵀ) = Σᵢ sᵢ² with sᵢ the singular values of ΔW C^½,
and on the bundled Gemma the first batch's top component alone carries 14 % of it, the top ten
42 % (research/NOTES.md).  This replays the recorded run (research.memit_replay,
its own settings: the recorded weights), then measures variants of the final ΔW:

- ``{"whitened_top": k, "keep": γ}``: the top k components of ΔW C^½ scaled by γ,
  ΔW' = ΔW − (1 − γ) Σ_{i≤k} sᵢ uᵢ vᵢᵀ C^−½;
- ``{"prune": true}``: PRUNE's restraint of ΔW's own singular values σ > σ_max(W),
  σ ← ln σ − ln σ_max(W) + σ_max(W) (the paper's F with base e);
- ``{"rect": q}``: RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large
  Language Models: Regularization to the Rescue", arXiv 2401.04700) keeps the fraction q of
  ΔW's entries with the largest relative change |ΔWᵢⱼ| / |Wᵢⱼ| and zeroes the rest (applied
  here once, to the accumulated update).

    python -m research.experiments.restrained_update results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 \\
        '[{}, {"whitened_top": 1, "keep": 0}, {"prune": true}]'

One JSON line per grid point on stdout (``{}``: the run itself).  Results: research/NOTES.md.
"""

import json
import math
import sys
import time

import torch

from factpatch.editing import base_weights, load_weights
from factpatch.evaluation.counterfact import summarise
from factpatch.evaluation.sequential import (
    heldout_paragraphs,
    measure_records,
    perplexity,
    run_paragraphs,
)
from factpatch.models.loading import load_model
from research.memit_replay import open_run, replay, run_covariance


def restrain_whitened(change: torch.Tensor, cov: torch.Tensor, top: int, keep: float):
    """ΔW with the top ``top`` components of ΔW C^½ scaled by ``keep``; also the components'
    shares of tr(ΔW C ΔWᵀ)."""
    eigvals, eigvecs = torch.linalg.eigh(cov)  # float64, ascending
    root = eigvals.clamp(min=0).sqrt()
    inv_root = torch.where(root > root.max() * 1e-10, 1 / root, torch.zeros_like(root))
    whitened = change @ eigvecs @ torch.diag(root)  # ΔW C^½ in C's eigenbasis: [out, in]
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    removed = (u[:, :top] * ((1 - keep) * s[:top])) @ vh[:top]  # [out, in], same basis
    restrained = change - removed @ torch.diag(inv_root) @ eigvecs.T
    shares = (s**2 / (s**2).sum())[:10].tolist()
    return restrained, shares


def prune(change: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """PRUNE's F on the singular values of ΔW above σ_max(W); how many it changed."""
    limit = float(torch.linalg.svdvals(weight)[0])
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    big = s > limit
    s = torch.where(big, torch.log(s) - math.log(limit) + limit, s)
    return (u * s) @ vh, int(big.sum())


def rect(change: torch.Tensor, weight: torch.Tensor, keep: float) -> torch.Tensor:
    """ΔW with only the fraction ``keep`` of its entries of largest |ΔWᵢⱼ| / |Wᵢⱼ| (RECT)."""
    relative = (change.abs() / weight.abs().clamp(min=1e-12)).flatten()
    n_keep = max(1, round(keep * relative.numel()))
    threshold = torch.topk(relative, n_keep).values[-1]
    return torch.where(relative.view_as(change) >= threshold, change, torch.zeros_like(change))


def main(run: str, data: str, batches: int, grid: list[dict]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer = report["layers"][0]
    path = handle.adapter.rewrite_path(layer)
    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    base = base_weights(handle, [path])
    cov = run_covariance(handle, report).double().cpu()
    lam = report["hparams"]["mom2_update_weight"]
    weight0 = base[path].double().cpu()
    change = replay(handle, report, deltas, records, lam)[-1].cpu() - weight0
    for point in grid:
        t0 = time.perf_counter()
        info: dict = {}
        edited = change
        if point.get("prune"):
            edited, info["restrained"] = prune(change, weight0)
        elif "rect" in point:
            edited = rect(change, weight0, point["rect"])
        elif "whitened_top" in point:
            edited, info["top_shares"] = restrain_whitened(
                change, cov, point["whitened_top"], point["keep"]
            )
        load_weights(handle, {path: weight0 + edited})
        measured = measure_records(handle, records)
        line = {
            **point,
            **info,
            "n_edits": len(records),
            "wear": float(torch.trace(edited @ cov @ edited.T)),
            "norm_ratio": float(edited.norm() / change.norm()),
            "sigma_max_change": float(torch.linalg.svdvals(edited)[0]),
            "sigma_max_weight": float(torch.linalg.svdvals(weight0)[0]),
            "paragraphs": len(held),
            "perplexity": perplexity(handle, held),
            "unedited_perplexity": report["unedited_perplexity"],
            **summarise(measured),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        load_weights(handle, base)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
