"""Hyperparameter sweep for ROME defaults: single-edit CounterFact over a grid of settings.

    python -m research.sweep --data ../shared/data/counterfact/counterfact-train.json --n 30 \
        --grid '{"layer": [2, 4, 6]}' --out results/sweep.json

Each grid point is evaluated on the same records; one JSON line per point is appended to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from factpatch.editing import default_hparams
from factpatch.evaluation.counterfact import evaluate, load_records
from factpatch.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--grid", default='{"layer": [4]}', help="JSON: name -> list of values")
    parser.add_argument("--base", default="{}", help="JSON: fixed overrides")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    handle = load_model(args.model)
    records = load_records(args.data)[args.offset : args.offset + args.n]
    grid = json.loads(args.grid)
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        hp = default_hparams(handle, **{**json.loads(args.base), **point})
        started = time.perf_counter()
        report = evaluate(handle, records, hp, progress=False).report()
        row = {
            "point": point,
            "hparams": hp.to_dict(),
            "wall_seconds": time.perf_counter() - started,
        }
        row.update(report)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        u = report["unedited"]
        print(
            f"{point}: ES {report['efficacy']:.1f} PS {report['paraphrase']:.1f} "
            f"NS {report['neighborhood']:.1f} (unedited {u['neighborhood']:.1f}) "
            f"S {report['score']:.1f} median {report['median_seconds_per_edit']:.2f}s "
            f"refused {report['refused']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
