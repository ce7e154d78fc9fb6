"""Re-solve a recorded sequential MEMIT run under another λ, or with its residuals shrunk,
without optimising the targets again: the trade-off between efficacy and wear in minutes,
where a new run takes hours.

    python -m research.memit_replay --run results/seq1000/memit \\
        --data ../shared/data/counterfact/counterfact-val.json --batches 3 \\
        --grid '[{"lam": 1000}, {"lam": 3000}, {"lam": 300, "scale": 0.6}]' \\
        --out research/results/memit_replay_val300.jsonl

For a run that edits one layer l, what is exact: the keys at l depend only on the layers below
it, never on l's own rewrite module, so each batch's template-averaged keys K [in, B] (stored
in its delta) and its bare-prompt keys k (recomputed here) are the keys any run over the same
records sees.  What is kept from the recorded run (the approximation): the target value of each
fact, v*ᵢ = W_{b−1} kᵢ + Rᵢ, with R its delta's left factor and W_{b−1} the recorded model before
batch b; a run with other settings would optimise δ again against its own model.  Batch b is
re-solved on the replayed model W'_{b−1} as (MEMIT eq. 14, float64)

    R'ᵢ = s · (Rᵢ + (W_{b−1} − W'_{b−1}) kᵢ),    Δ'_b = R' Kᵀ (λ'·C + α·I + μ'·K_pK_pᵀ + K Kᵀ)⁻¹

with K_pK_pᵀ the earlier batches' keys.  With λ' and μ' the run's, α = 0 and s = 1 the replay
reproduces the recorded run's weights.  A grid point's ``prior`` sets μ', its ``ridge`` α, its
``cov_tokens`` re-solves with C estimated from that many tokens; ``--paragraphs`` measures
perplexity on another held-back set than the run's (the unedited value is then measured too).

α·I is a Frobenius-norm penalty α‖ΔW‖²_F in MEMIT's least squares (the norm constraint of
Gupta et al. 2025, "Lifelong Knowledge Editing requires Better Regularization", arXiv
2502.01636).  With μ' = 1 the batches solve one recursive least-squares problem, so the penalty
falls on the whole accumulated change: the replay then minimises, over the run's targets,
λ'‖(W − W₀) C^½‖² + α‖W − W₀‖² + Σᵢ ‖W kᵢ − v*ᵢ‖².
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from factpatch.editing import Delta, base_weights, load_weights
from factpatch.editing.keys import Rows, trace
from factpatch.editing.solve import covariances
from factpatch.evaluation.counterfact import load_records, request_for, summarise
from factpatch.evaluation.sequential import (
    checkpoint_deltas,
    heldout_paragraphs,
    measure_records,
    perplexity,
    run_paragraphs,
)
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle
from research.memit_sweep import emit


def load_run(folder: str | Path) -> tuple[dict[str, Any], list[Delta]]:
    """A sequential run's progress.json and its deltas, in order; refuses what it cannot
    replay (another method, more than one layer)."""
    folder = Path(folder)
    report = json.loads((folder / "progress.json").read_text())
    if report["method"] != "memit" or len(report["layers"]) != 1:
        raise ValueError(
            f"run: {folder} is {report['method']} over layers {report['layers']}; "
            "only single-layer MEMIT runs replay exactly"
        )
    if report["hparams"].get("key_templates"):
        raise ValueError(
            f"run: {folder} fits every context's key (key_templates); the replay re-solves "
            "the template-averaged keys only"
        )
    return report, checkpoint_deltas(folder)


def open_run(
    folder: str | Path, data: str | Path, batches: int | None = None
) -> tuple[dict[str, Any], list[Delta], list[dict[str, Any]]]:
    """A run's report, its first ``batches`` deltas (None: all) and the records they edited
    (the first of ``data``, the run's CounterFact file)."""
    report, deltas = load_run(folder)
    deltas = deltas[:batches]
    return report, deltas, load_records(data)[: len(deltas) * report["batch"]]


@torch.no_grad()
def replay(
    handle: ModelHandle,
    report: dict[str, Any],
    deltas: list[Delta],
    records: list[dict[str, Any]],
    lam: float,
    scale: float = 1.0,
    cov: torch.Tensor | None = None,
    prior: float | None = None,
    ridge: float = 0.0,
    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The edited layer's weight (float64, (out, in)) after each replayed batch; ``handle``
    must hold the run's unedited model (its weights are read, never written).  ``cov`` [in, in]
    re-solves with another key covariance (default: the run's); ``prior`` is the weight μ of the
    earlier batches' keys in the preserved term, ``μ · Σ K_p K_pᵀ`` (default: the run's);
    ``ridge`` is α, added as ``α·I`` to the same term.  ``solve(R'ᵀ [B, out], K [in, B], M)``,
    M = μ·Σ K_pK_pᵀ + K Kᵀ, replaces the batch's solve (default: MEMIT's, above) and returns its
    update [out, in]."""
    if prior is None:
        prior = float(report["hparams"].get("prior_weight", 0.0))
    layer, batch = report["layers"][0], report["batch"]
    path = handle.adapter.rewrite_path(layer)
    if cov is None:
        cov = run_covariance(handle, report)
    cov = cov.double().to(handle.device)
    recorded = handle.rewrite_weight(layer).double().clone()  # W_{b−1}, the run's model
    replayed = recorded.clone()  # W'_{b−1}
    gram = torch.zeros_like(cov)  # Σ K_p K_pᵀ over the batches before b
    preserved = lam * cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)

    def memit_solve(resid: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return resid.T @ torch.linalg.solve(preserved + kept, K).T  # [out, in]

    solve = solve or memit_solve
    out = []
    for b, delta in enumerate(deltas):
        requests = [request_for(r) for r in records[b * batch : (b + 1) * batch]]
        rows = Rows.build(handle, requests, ["{}"])
        k_bare = trace(handle, rows, [layer], {}, layer).keys[layer].double()  # [B, in]
        left, right = (f.double().to(recorded.device) for f in delta.factors[path])
        if left.shape[1] != len(requests):
            raise ValueError(f"records: batch {b} of the run has {left.shape[1]} facts")
        resid = scale * (left.T + k_bare @ (recorded - replayed).T)  # R'ᵀ: [B, out]
        K = delta.keys[path].double().to(recorded.device)  # [in, B]
        update = solve(resid, K, prior * gram + K @ K.T)
        gram += K @ K.T
        recorded += left @ right.T
        replayed += update
        out.append(replayed.clone())
    return out


def measure_point(
    handle: ModelHandle, records: list[dict[str, Any]], batch: int, held: list[str]
) -> dict[str, Any]:
    """The model as loaded now, scored as a replay line reports it: perplexity on ``held``,
    ES / PS / NS over ``records`` and per batch of ``batch`` records, oldest first."""
    measured = measure_records(handle, records)
    return {
        "paragraphs": len(held),
        "perplexity": perplexity(handle, held),
        **summarise(measured),
        "by_batch": [summarise(measured[b : b + batch]) for b in range(0, len(records), batch)],
    }


def scored_replay(
    handle: ModelHandle,
    report: dict[str, Any],
    deltas: list[Delta],
    records: list[dict[str, Any]],
    held: list[str],
    base: dict[str, torch.Tensor],
    lam: float,
    cov: torch.Tensor,
    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """:func:`replay` at ``lam`` with ``cov`` (and ``solve``), scored as an experiment's replay
    line: λ, the wear tr(ΔW C ΔWᵀ) of the final change, :func:`measure_point` and the
    perplexity's relative change; ``base`` (the edited layer's unedited weight, as
    :func:`base_weights` returns it) is loaded back at the end."""
    ((path, weight0),) = base.items()
    weights = replay(handle, report, deltas, records, lam, cov=cov, solve=solve)
    change = weights[-1] - weight0.double()
    load_weights(handle, {path: weights[-1].float()})
    try:
        line = {
            "lam": lam,
            "n_edits": len(records),
            "wear": float(torch.trace(change @ cov @ change.T)),
            "unedited_perplexity": report["unedited_perplexity"],
            **measure_point(handle, records, report["batch"], held),
        }
    finally:
        load_weights(handle, base)
    line["perplexity_change"] = line["perplexity"] / line["unedited_perplexity"] - 1
    return line


def run_covariance(
    handle: ModelHandle, report: dict[str, Any], n_tokens: int | None = None
) -> torch.Tensor:
    """C of the run's edited layer from its corpus (the bundled one), over the run's token count
    or ``n_tokens``."""
    layer = report["layers"][0]
    n_tokens = n_tokens or report["hparams"]["cov_tokens"]
    return covariances(handle, [layer], n_tokens, None)[layer]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a sequential run's checkpoint folder")
    parser.add_argument("--data", required=True, help="the run's CounterFact JSON")
    parser.add_argument("--model", default=None, help="the run's model (default: bundled)")
    parser.add_argument("--batches", type=int, default=None, help="replay the first N batches")
    parser.add_argument(
        "--grid",
        required=True,
        help='JSON list of {"lam": λ, "scale": s, "prior": μ, "ridge": α, "cov_tokens": n}',
    )
    parser.add_argument(
        "--paragraphs", type=int, default=None, help="held-back paragraphs (default: the run's)"
    )
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--out", default=None, help="append one JSON line per grid point")
    args = parser.parse_args(argv)

    report, deltas, records = open_run(args.run, args.data, args.batches)
    handle = load_model(args.model or "gemma-3-270m", device=args.device, dtype="float32")
    path = handle.adapter.rewrite_path(report["layers"][0])
    base = base_weights(handle, [path])
    held, _ = heldout_paragraphs(None, args.paragraphs or run_paragraphs(report))
    unedited = report["unedited_perplexity"]
    if len(held) != run_paragraphs(report):
        unedited = perplexity(handle, held)  # the run's figure is on its own paragraphs
    for point in json.loads(args.grid):
        t0 = time.perf_counter()
        weights = replay(
            handle,
            report,
            deltas,
            records,
            point["lam"],
            point.get("scale", 1.0),
            run_covariance(handle, report, point.get("cov_tokens")),
            point.get("prior"),
            point.get("ridge", 0.0),
        )
        load_weights(handle, {path: weights[-1]})
        line = {
            **point,
            "n_edits": len(records),
            "total_update_ratio_per_fact": float(
                (weights[-1] - base[path].double()).norm()
                / base[path].double().norm()
                / math.sqrt(len(records))
            ),
            "unedited_perplexity": unedited,
            **measure_point(handle, records, report["batch"], held),
            "seconds": time.perf_counter() - t0,
        }
        load_weights(handle, base)
        emit(line, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
