"""Experiment record: how large must a target δ be, measured in what the text cares about?

MEMIT's update is ΔW = R Kᵀ A⁻¹ with R = [δ₁ … δ_B] the targets in the rewrite module's output
space; its cost on text is ≈ ½·T·tr(G ΔW C ΔWᵀ) (factpatch/editing/fisher.py), so each target
contributes in proportion to δᵀ G δ.  The reference optimiser (Adam, lr 0.5, ‖δ‖ ≤ clamp·‖v‖)
takes sign-like steps that reach the clamp at once: δ's size is the clamp's, its direction
Adam's.  This compares, per edit on the unedited model and with the model's MEMIT defaults
otherwise, the reference δ against ``z_metric = "fisher"`` at step sizes ``lrs``: ‖δ‖, δᵀGδ,
final NLL, steps.

    python bench/experiments/target_metric.py ../shared/data/counterfact/counterfact-val.json \\
        6 '[0.1, 0.2, 0.3]'

One JSON line per record and a summary (median δᵀGδ relative to the reference) on stdout.
Results: docs/evaluation.md.
"""

import json
import statistics
import sys
import time

from factpatch.editing.fisher import output_fisher, output_metric
from factpatch.editing.hparams import default_memit_hparams
from factpatch.editing.rome import _optimise
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import load_records, request_for
from factpatch.models.loading import load_model


def main() -> None:
    data, n, lrs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    h = load_model("gemma-3-270m", device="cpu", dtype="float32")
    reference = default_memit_hparams(h, z_metric="euclidean").z_hparams()
    templates = context_templates(h, [tuple(t) for t in reference.templates], 0)
    t0 = time.perf_counter()
    G = output_fisher(h, reference.layer, reference.fisher_tokens).float()
    metric = output_metric(h, reference.layer, reference.fisher_tokens)
    print(json.dumps({"G_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    ratios: dict[float, list[float]] = {lr: [] for lr in lrs}
    steps: dict[float, list[int]] = {lr: [] for lr in lrs}
    for record in load_records(data, n):
        request = request_for(record)
        row = {"case": record["case_id"]}
        for lr in [None, *lrs]:
            hp = (
                reference
                if lr is None
                else reference.with_overrides(z_metric="fisher", lr=lr, steps=60)
            )
            _, _, delta, stats = _optimise(h, request, hp, templates, None, metric)
            row[str(lr or "reference")] = {
                "norm": round(stats.delta_norm, 3),
                "gGg": round(float(delta @ G @ delta), 4),
                "nll": round(stats.nll_end, 4),
                "steps": stats.steps,
            }
            if lr is not None and stats.nll_end < hp.early_stop_nll:
                ratios[lr].append(row[str(lr)]["gGg"] / row["reference"]["gGg"])
                steps[lr].append(stats.steps)
        print(json.dumps(row), flush=True)
    summary = {
        lr: {
            "reached": len(ratios[lr]),
            "median_gGg_ratio": statistics.median(ratios[lr]) if ratios[lr] else None,
            "mean_steps": statistics.mean(steps[lr]) if steps[lr] else None,
        }
        for lr in lrs
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
