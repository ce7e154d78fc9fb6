"""Experiment record: fit every context's key, not only their mean.

MEMIT averages each fact's key over its context templates (the bare prompt and the random
prefixes) and asks the update to map the mean to the target: ‖ΔW k̄ᵢ − rᵢ‖².  Asking it of every
context's key instead, with the contexts weighted 1/T so that a fact still counts once,

    Σᵢ (1/T) Σ_t ‖ΔW kᵢₜ − rᵢ‖² = Σᵢ ‖ΔW k̄ᵢ − rᵢ‖² + tr(ΔW S ΔWᵀ),
    S = Σᵢ (1/T) Σ_t (kᵢₜ − k̄ᵢ)(kᵢₜ − k̄ᵢ)ᵀ,

adds the within-fact spread of the keys as one more preserved term: the update is asked to
answer the same whichever context precedes the subject, which is what a paraphrase needs.  The
solve keeps MEMIT's form, Δ = R K̄ᵀ (λC + μ(K_pK_pᵀ + ω S_p) + K̄K̄ᵀ + ω S)⁻¹ (ω weighs the new
term; ω 1 is the per-context least squares above), replayed over a recorded run with its
targets (:func:`research.memit_replay.replay`).

    python -m research.experiments.context_keys results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 '[{"omega": 1}, {"omega": 3}]'

One JSON line per grid point on stdout (a point may also set ``lam``, and ``spread_templates``,
e.g. ``[[10, 20]]``, to estimate S from other context templates than the run's).  Results:
research/NOTES.md.
"""

import json
import sys
import time
from typing import Any

import torch

from factpatch.editing import base_weights
from factpatch.editing.keys import Rows, trace
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import request_for
from factpatch.evaluation.sequential import (
    heldout_paragraphs,
    run_paragraphs,
)
from factpatch.models.loading import load_model
from research.memit_replay import open_run, run_covariance, scored_replay


def within_spread(handle, layer: int, records: list[dict[str, Any]], templates: list[str]):
    """S [in, in] (float64): each fact's context keys' scatter about their mean, over T."""
    rows = Rows.build(handle, [request_for(r) for r in records], templates)
    keys = trace(handle, rows, [layer], {}, layer).keys[layer].double()  # [rows, in]
    centred = keys - rows.average(keys)[rows.owner.to(keys.device)]
    return centred.T @ centred / len(templates)


class ContextSolve:
    """``replay``'s batch solve with the within-fact spread S of this batch and (times μ) of the
    earlier ones added to the preserved term."""

    def __init__(self, spreads: list[torch.Tensor], cov, lam: float, prior: float, omega: float):
        self.spreads, self.cov, self.lam, self.prior, self.omega = spreads, cov, lam, prior, omega
        self.b = 0

    def __call__(self, resid: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        earlier = sum(self.spreads[: self.b], torch.zeros_like(self.cov))
        spread = self.omega * (self.prior * earlier + self.spreads[self.b])
        self.b += 1
        return resid.T @ torch.linalg.solve(self.lam * self.cov + kept + spread, K).T


def main(run: str, data: str, batches: int, grid: list[dict[str, Any]]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer, batch = report["layers"][0], report["batch"]
    path = handle.adapter.rewrite_path(layer)
    base = base_weights(handle, [path])
    cov = run_covariance(handle, report).double()
    hp = report["hparams"]
    templates = context_templates(handle, [tuple(t) for t in hp["templates"]], hp["template_seed"])
    spreads_by: dict[str, list[torch.Tensor]] = {}

    def spreads_for(spec: list[list[int]] | None) -> list[torch.Tensor]:
        """S of every batch from the run's templates, or from ``spec``'s (same seed)."""
        key = json.dumps(spec)
        if key not in spreads_by:
            mine = templates
            if spec is not None:
                mine = context_templates(handle, [tuple(t) for t in spec], hp["template_seed"])
            spreads_by[key] = [
                within_spread(handle, layer, records[b * batch : (b + 1) * batch], mine)
                for b in range(batches)
            ]
        return spreads_by[key]

    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    lam_run, prior = float(hp["mom2_update_weight"]), float(hp["prior_weight"])
    print(
        json.dumps(
            {
                "spread_trace_per_fact": [float(s.trace()) / batch for s in spreads_for(None)],
                "cov_trace": float(cov.trace()),
            }
        ),
        flush=True,
    )
    for point in grid:
        t0 = time.perf_counter()
        lam = float(point.get("lam", lam_run))
        spreads = spreads_for(point.get("spread_templates"))
        solve = ContextSolve(spreads, cov, lam, prior, point["omega"])
        line = {
            **point,
            **scored_replay(handle, report, deltas, records, held, base, lam, cov, solve),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
