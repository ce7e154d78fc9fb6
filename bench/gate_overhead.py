"""What serving edits behind key gates costs at inference, against the same edits in the weights.

    flock /tmp/fp-heavy.lock .venv/bin/python bench/gate_overhead.py \\
        results/seq1000/memit-layer4-lam75-prior1 --points 100 400 1000 \\
        --out bench/results/gate_overhead.json

For each number of edits (the first deltas of a checkpointed sequential run), the same forward
passes — the perplexity pass over held-back paragraphs, 4 per batch, ≤ 128 tokens — are timed
with the deltas materialised into the weights and behind key gates (factpatch/editing/gate.py),
alternating, ``--repeats`` times each; the figure is the ratio of the medians.  Ratios, not
seconds: both sides run in the same process on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from factpatch.editing import base_weights, load_weights, materialize
from factpatch.editing.covariance import layer_covariances
from factpatch.editing.gate import gated
from factpatch.evaluation.sequential import checkpoint_deltas, heldout_paragraphs, perplexity
from factpatch.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a sequential run's checkpoint folder")
    parser.add_argument("--points", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--paragraphs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    handle = load_model("gemma-3-270m", device=args.device, dtype=args.dtype)
    report = json.loads((Path(args.run) / "progress.json").read_text())
    deltas = checkpoint_deltas(args.run)
    ends = list(itertools.accumulate(d.factors[next(iter(d.factors))][0].shape[1] for d in deltas))
    paths = sorted({p for d in deltas for p in d.factors})
    base = base_weights(handle, paths)
    layers = report["layers"]
    stats = layer_covariances(handle, layers, report["hparams"]["cov_tokens"])
    covariances = {handle.adapter.rewrite_path(j): stats[j].cov for j in layers}
    held, _ = heldout_paragraphs(None, args.paragraphs)
    perplexity(handle, held[:4])  # warm-up
    rows = []
    for n in args.points:
        if n not in ends:
            continue
        upto = deltas[: ends.index(n) + 1]
        weights = materialize(handle, base, upto)
        seconds: dict[str, list[float]] = {"weights": [], "gated": []}
        for _ in range(args.repeats):
            load_weights(handle, weights)
            t0 = time.perf_counter()
            perplexity(handle, held)
            seconds["weights"].append(time.perf_counter() - t0)
            with gated(handle, base, upto, covariances, args.tau):
                t0 = time.perf_counter()
                perplexity(handle, held)
                seconds["gated"].append(time.perf_counter() - t0)
        load_weights(handle, base)
        row = {
            "n_edits": n,
            "seconds_weights": seconds["weights"],
            "seconds_gated": seconds["gated"],
            "ratio_of_medians": statistics.median(seconds["gated"])
            / statistics.median(seconds["weights"]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "run": args.run,
        "tau": args.tau,
        "paragraphs": args.paragraphs,
        "device": str(handle.device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
