"""Choose MEMIT / AlphaEdit settings on one batch of training records (never on validation).

    python -m factpatch.evaluation.memit_sweep \\
        --data ../shared/data/counterfact/counterfact-train.json --offset 0 --n 20 \\
        --grid '{"layers": [[2,3,4], [1,2,3,4]], "mom2_update_weight": [5000, 15000]}' \\
        --out bench/results/memit_sweep_train.jsonl

Every grid point edits the same batch at once on the base model and measures ES/PS/NS on it
(the single-batch setting of MEMIT's Fig. 5).  The target vectors zᵢ depend only on the last
layer and the optimisation settings, so they are computed once per last layer and reused across
the grid (memoised by request): only the spreading, the solves and the measurement are redone.
Also prints the eigenvalue spectrum of each layer's key covariance (AlphaEdit's null space).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

import torch

from factpatch.editing import (
    apply_delta,
    base_weights,
    compute_alphaedit,
    compute_memit,
    default_memit_hparams,
    load_weights,
)
from factpatch.editing import memit as memit_module
from factpatch.editing.covariance import layer_covariances
from factpatch.evaluation.counterfact import load_records, request_for, summarise
from factpatch.evaluation.sequential import measure_records
from factpatch.models import load_model
from factpatch.models.options import model_args


def _memoise_targets() -> None:
    """Cache ROME's δ optimisation per (request, layer, settings) inside this process."""
    original = memit_module._optimise
    memo: dict[Any, Any] = {}

    def cached(handle, request, hp, templates, prior, upper=None):
        key = (request, hp)
        if prior is not None or key not in memo:
            memo[key] = original(handle, request, hp, templates, prior, upper)
        return memo[key]

    memit_module._optimise = cached


def _points(grid: str) -> list[dict[str, Any]]:
    table = json.loads(grid)
    return [dict(zip(table, values, strict=True)) for values in itertools.product(*table.values())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)  # --model, --device, --dtype
    parser.add_argument("--data", required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--grid", default="{}", help="MEMIT grid, JSON: name → list of values")
    parser.add_argument("--alpha-grid", help="AlphaEdit grid (same form), run after MEMIT's")
    parser.add_argument("--spectrum", action="store_true", help="print eigenvalue quantiles")
    parser.add_argument("--out", help="append one JSON line per grid point")
    args = parser.parse_args(argv)

    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    records = load_records(args.data)[args.offset : args.offset + args.n]
    requests = [request_for(r) for r in records]
    points = [("memit", p) for p in _points(args.grid)]
    points += [("alphaedit", p) for p in _points(args.alpha_grid)] if args.alpha_grid else []
    layers = sorted({j for _, p in points for j in p.get("layers", [])} or {0})
    all_layers = sorted(set(layers) | set(default_memit_hparams(handle).layers))
    covs = layer_covariances(handle, all_layers, default_memit_hparams(handle).cov_tokens)
    if args.spectrum:
        for j, stats in covs.items():
            eig = torch.linalg.eigvalsh(stats.cov)
            quantiles = [float(eig.quantile(q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)]
            below = {t: int((eig < t).sum()) for t in (1e-3, 1e-2, 2e-2, 5e-2, 1e-1)}
            print(f"layer {j}: quantiles {[f'{q:.3g}' for q in quantiles]} below {below}")
    _memoise_targets()
    paths = [handle.adapter.rewrite_path(j) for j in all_layers]
    base = base_weights(handle, paths)
    unedited = summarise(measure_records(handle, records))
    print(f"unedited: {json.dumps(unedited)}", file=sys.stderr)
    for method, point in points:
        hp = default_memit_hparams(handle, **point)
        started = time.perf_counter()
        if method == "memit":
            delta = compute_memit(handle, requests, hp)
        else:
            delta, _ = compute_alphaedit(handle, requests, hp)
        seconds = time.perf_counter() - started
        apply_delta(handle, delta)
        result = summarise(measure_records(handle, records))
        load_weights(handle, base)
        line = {
            "method": method,
            "data": args.data,
            "offset": args.offset,
            "n": args.n,
            "point": point,
            **{k: result[k] for k in ("efficacy", "paraphrase", "neighborhood", "score")},
            "unedited_neighborhood": unedited["neighborhood"],
            "layer_stats": delta.provenance["layer_stats"],
            "z_nll": [round(z["nll_end"], 3) for z in delta.provenance["stats"]],
            "seconds": seconds,
        }
        emit(line, args.out)
    return 0


def emit(line: dict[str, Any], out: str | None) -> None:
    """Print one result line as JSON, and append it to ``out`` (JSON lines) when given."""
    print(json.dumps(line), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
