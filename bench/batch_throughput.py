"""Seconds per edit of MEMIT (and AlphaEdit) at several batch sizes on this machine.

    flock /tmp/fp-heavy.lock .venv/bin/python bench/batch_throughput.py --sizes 1 10 100 \\
        --out bench/results/batch_throughput.json

Each batch is computed once on the base model (``compute_memit`` is pure) from CounterFact
training records past the ones used to choose the defaults.  One-time work (covariance, context
templates, AlphaEdit's projectors) is done first and not timed; the per-phase seconds come from
each delta's provenance (``optimise``: the zᵢ, one ROME-style optimisation per edit; ``keys``:
the forward passes that collect keys and residuals, one per layer; ``solve``: the float64
solves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from factpatch.editing import (
    SequentialState,
    compute_alphaedit,
    compute_edit,
    compute_memit,
    default_hparams,
    default_memit_hparams,
)
from factpatch.evaluation.counterfact import load_records, request_for
from factpatch.models import load_model
from factpatch.models.options import model_args

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/data/counterfact/counterfact-train.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)  # --model, --device, --dtype
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--offset", type=int, default=1000, help="first training record used")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--alphaedit", action="store_true", help="also time AlphaEdit")
    parser.add_argument("--out", default="bench/results/batch_throughput.json")
    args = parser.parse_args()

    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    hp = default_memit_hparams(handle)
    records = load_records(args.data)[args.offset : args.offset + max(args.sizes)]
    requests = [request_for(r) for r in records]
    t0 = time.perf_counter()
    compute_memit(handle, requests[:1], hp.with_overrides(steps=0))  # warm: caches
    if args.alphaedit:
        compute_alphaedit(handle, requests[:1], hp.with_overrides(steps=0))
    compute_edit(handle, requests[0], default_hparams(handle))  # ROME's covariance too
    warm = time.perf_counter() - t0

    rows = []
    rome = compute_edit(handle, requests[0], default_hparams(handle))
    rows.append(
        {
            "method": "rome",
            "batch": 1,
            "seconds": rome.provenance["seconds"]["total"],
            "seconds_per_edit": rome.provenance["seconds"]["total"],
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    methods = ["memit", "alphaedit"] if args.alphaedit else ["memit"]
    for size in args.sizes:
        for method in methods:
            started = time.perf_counter()
            if method == "memit":
                delta = compute_memit(handle, requests[:size], hp)
            else:
                delta, _ = compute_alphaedit(handle, requests[:size], hp, state=SequentialState())
            total = time.perf_counter() - started
            phases = delta.provenance["seconds"]
            rows.append(
                {
                    "method": method,
                    "batch": size,
                    "seconds": total,
                    "seconds_per_edit": total / size,
                    "phases": {k: v for k, v in phases.items() if k != "total"},
                    "z_steps_mean": sum(s["steps"] for s in delta.provenance["stats"]) / size,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": handle.name,
        "layers": list(hp.layers),
        "hparams": hp.to_dict(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "device": str(handle.device),
            "dtype": str(handle.dtype).removeprefix("torch."),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "warmup_seconds": warm,
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
