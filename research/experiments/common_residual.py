"""Experiment record: the residual direction every edit shares.

The MEMIT residuals rᵢ = v*ᵢ − W kᵢ of a batch (the output change each fact's key must get) are
not independent: over the default run's first 400 validation edits their mean carries 27 % of
Σ‖rᵢ‖² and the mean cosine to it is 0.41 (0.61 of the mean norm in the first batch, 0.33 in the
fourth — later subjects already get part of it from the earlier batches' update).  A direction
all facts want, written at keys that all share a subject-name component, is what a linear update
carries to every other name in text — where the perplexity rise sits (research/NOTES.md, "Where
the wear sits").  This replays a recorded sequential run
(:func:`research.memit_replay.replay`, the run's targets) with that component of each
batch's residuals shrunk:

    u = r̄ / ‖r̄‖  (r̄ the mean of the batch's residuals, or of the whole run's with "run")
    rᵢ ← rᵢ − α (uᵀrᵢ) u,    Δ_b = R' Kᵀ (λC + μ K_pK_pᵀ + K Kᵀ)⁻¹

    python -m research.experiments.common_residual results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 '[{"alpha": 1.0}, {"alpha": 0.5}]'

One JSON line per grid point on stdout (a point may also set ``lam``; ``direction`` "batch"
(default) or "run").  Results: research/NOTES.md.
"""

import json
import sys
import time
from typing import Any

import torch

from factpatch.editing import base_weights
from factpatch.evaluation.sequential import heldout_paragraphs, run_paragraphs
from factpatch.models.loading import load_model
from research.memit_replay import open_run, run_covariance, scored_replay


class CommonShrunk:
    """``replay``'s batch solve with the residuals' shared direction shrunk by ``alpha``."""

    def __init__(self, cov: torch.Tensor, lam: float, alpha: float, fixed: torch.Tensor | None):
        self.cov, self.lam, self.alpha, self.fixed = cov, lam, alpha, fixed
        self.shares: list[float] = []  # per batch: share of Σ‖rᵢ‖² along u before shrinking

    def __call__(self, resid: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        # resid: R'ᵀ [B, out]; K [in, B]; kept = μ K_pK_pᵀ + K Kᵀ [in, in]
        mean = resid.mean(0) if self.fixed is None else self.fixed.to(resid)
        u = mean / mean.norm()  # [out]
        along = resid @ u  # [B]
        self.shares.append(float((along**2).sum() / (resid**2).sum()))
        resid = resid - self.alpha * along[:, None] * u[None, :]
        return resid.T @ torch.linalg.solve(self.lam * self.cov + kept, K).T  # [out, in]


def main(run: str, data: str, batches: int, grid: list[dict[str, Any]]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer = report["layers"][0]
    path = handle.adapter.rewrite_path(layer)
    base = base_weights(handle, [path])
    cov = run_covariance(handle, report).double()
    recorded = torch.cat([d.factors[path][0].double() for d in deltas], 1)  # R [out, N]
    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    lam_run = float(report["hparams"]["mom2_update_weight"])
    for point in grid:
        t0 = time.perf_counter()
        lam = float(point.get("lam", lam_run))
        fixed = recorded.mean(1) if point.get("direction", "batch") == "run" else None
        solve = CommonShrunk(cov, lam, float(point["alpha"]), fixed)
        line = {
            **point,
            **scored_replay(handle, report, deltas, records, held, base, lam, cov, solve),
            "common_share_by_batch": [round(s, 4) for s in solve.shares],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
