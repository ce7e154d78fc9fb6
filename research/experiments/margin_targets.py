"""Experiment record: size each fact's residual after the solve, not before it.

Every MEMIT target δ on the bundled Gemma ends at the clamp (research/NOTES.md), and the solve
then inserts a fact-dependent share of it: some facts come out far past what their prompts need,
others short.  λ scales every fact's share alike.  This replays a recorded sequential run
(:func:`research.memit_replay.replay`, the run's target values) with a per-fact
factor sᵢ on the residual, set by a controller that reads only what an editor has — the request's
own prompt and the run's context templates (the bare prompt and the random prefixes), never the
paraphrase or neighbourhood prompts the evaluation scores:

    Δ_b = R' diag(s) Kᵀ (λC + μ K_pK_pᵀ + K Kᵀ)⁻¹            (MEMIT eq. 14 with scaled columns)
    nllᵢ = mean over the templates of −(1/|o|) log P(o_new | template(promptᵢ))   on W'_{b−1} + Δ_b

each sᵢ bisected (geometrically, ``iters`` rounds, all facts of the batch at once) in
[s_min, s_max] for the smallest s with nllᵢ ≤ τ; a fact that misses τ even at s_max keeps s_max.
So a fact already past τ gives back part of its residual and (with s_max > 1) a fact short of it
gets more.  (A first, multiplicative controller, sᵢ ← sᵢ·(nllᵢ/τ)^½, oscillated: the NLL falls
from ≈ 4 to ≈ 0.1 between s ≈ 0.6 and 1, so it was dropped.)

    python -m research.experiments.margin_targets results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 \\
        '[{"tau": 0.5, "iters": 7, "s_min": 0.3, "s_max": 1.5}]'

One JSON line per grid point on stdout (a point may also set ``lam``).  Results:
research/NOTES.md.
"""

import json
import math
import statistics
import sys
import time
from typing import Any

import torch

from factpatch.editing import base_weights, load_weights
from factpatch.editing.templates import context_templates
from factpatch.evaluation.sequential import (
    heldout_paragraphs,
    run_paragraphs,
    score_pairs,
)
from factpatch.models.loading import load_model
from research.memit_replay import open_run, run_covariance, scored_replay


def template_nll(handle, records: list[dict[str, Any]], templates: list[str]) -> torch.Tensor:
    """[B] each record's mean over the templates of the new object's mean-token NLL."""
    pairs = [(t.replace("{}", r["prompt"]), r["target_new"]) for r in records for t in templates]
    lp = torch.tensor(score_pairs(handle, pairs)).view(len(records), len(templates))
    return -lp.mean(1)


class Controller:
    """``replay``'s batch solve with the per-fact residual factors bisected against τ; keeps the
    replayed weight so that each probe scores the model edited so far plus this batch."""

    def __init__(self, handle, path, weight0, cov, records, batch, templates, lam, point):
        self.handle, self.path, self.cov, self.lam = handle, path, cov, lam
        self.records, self.batch, self.templates = records, batch, templates
        self.tau, self.iters = point["tau"], point["iters"]
        self.s_min, self.s_max = point["s_min"], point["s_max"]
        self.current = weight0.clone()  # W'_{b−1}
        self.log: list[dict[str, float]] = []

    def probe(self, s: torch.Tensor, resid: torch.Tensor, right: torch.Tensor):
        update = (s[:, None] * resid).T @ right.T  # [out, in]
        load_weights(self.handle, {self.path: (self.current + update).float()})
        mine = self.records[len(self.log) * self.batch : (len(self.log) + 1) * self.batch]
        return update, template_nll(self.handle, mine, self.templates).double().to(s.device)

    def __call__(self, resid: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        right = torch.linalg.solve(self.lam * self.cov + kept, K)  # [in, B]
        lo = torch.full((resid.shape[0],), self.s_min, dtype=resid.dtype, device=resid.device)
        hi = torch.full_like(lo, self.s_max)
        first = None
        for _ in range(self.iters):
            s = (lo * hi).sqrt()
            _, nll = self.probe(s, resid, right)
            first = nll if first is None else first
            short = nll > self.tau
            lo, hi = torch.where(short, s, lo), torch.where(short, hi, s)
        s = hi
        update, nll = self.probe(s, resid, right)
        first = nll if first is None else first
        self.log.append(
            {
                "batch": len(self.log),
                "nll_first_probe_median": float(first.median()),
                "nll_final_median": float(nll.median()),
                "nll_final_max": float(nll.max()),
                "s_mean": float(s.mean()),
                "s_median": float(s.median()),
                "s_at_min": int((s <= self.s_min * (1 + 1e-6)).sum()),
                "s_at_max": int((s >= self.s_max * (1 - 1e-6)).sum()),
            }
        )
        self.current = self.current + update
        return update


def main(run: str, data: str, batches: int, grid: list[dict[str, Any]]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer, batch = report["layers"][0], report["batch"]
    path = handle.adapter.rewrite_path(layer)
    base = base_weights(handle, [path])
    weight0 = base[path].double()
    cov = run_covariance(handle, report).double()
    hp = report["hparams"]
    templates = context_templates(handle, [tuple(t) for t in hp["templates"]], hp["template_seed"])
    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    lam_run = float(hp["mom2_update_weight"])

    for point in grid:
        t0 = time.perf_counter()
        lam = float(point.get("lam", lam_run))
        control = Controller(handle, path, weight0, cov, records, batch, templates, lam, point)
        line = {
            **point,
            **scored_replay(handle, report, deltas, records, held, base, lam, cov, control),
            "controller": control.log,
            "s_mean_all": statistics.fmean(x["s_mean"] for x in control.log),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        assert math.isfinite(line["perplexity"])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
