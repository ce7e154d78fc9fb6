"""Choose MEMIT / AlphaEdit settings on one batch of training records (never on validation).

    python -m research.memit_sweep \\
        --data ../shared/data/counterfact/counterfact-train.json --offset 0 --n 20 \\
        --grid '{"layers": [[2,3,4], [1,2,3,4]], "mom2_update_weight": [5000, 15000]}' \\
        --out research/results/memit_sweep_train.jsonl

Every grid point edits the same batch at once on the base model and measures ES/PS/NS on it
(the single-batch setting of MEMIT's Fig. 5).  The target vectors zᵢ depend only on the last
layer and the optimisation settings, so they are computed once per last layer and passed to the
solve at every grid point (:class:`Targets`): only the spreading, the solves and the
measurement are redone.
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
from factpatch.editing.covariance import layer_covariances
from factpatch.editing.hparams import MemitHParams
from factpatch.editing.requests import EditRequest
from factpatch.editing.targets import Target, optimise_target, upper_modules
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import load_records, request_for, summarise
from factpatch.evaluation.sequential import measure_records
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle
from factpatch.models.options import model_args


class Targets:
    """Each request's δ optimisation, kept per (request, last-layer settings) in this process
    and passed to the solve: the grid points that share a last layer share their targets."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.memo: dict[Any, Target] = {}

    def __call__(self, requests: list[EditRequest], hp: MemitHParams) -> list[Target]:
        z_hp = hp.z_hparams()
        missing = [r for r in requests if (r, z_hp) not in self.memo]
        if missing:
            templates = context_templates(
                self.handle, [tuple(t) for t in hp.templates], hp.template_seed
            )
            upper = upper_modules(self.handle, z_hp.layer, z_hp.optimise_dtype)
            for request in missing:
                self.memo[(request, z_hp)] = optimise_target(
                    self.handle, request, z_hp, templates, None, upper
                )
        return [self.memo[(r, z_hp)] for r in requests]


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
    targets = Targets(handle)
    paths = [handle.adapter.rewrite_path(j) for j in all_layers]
    base = base_weights(handle, paths)
    unedited = summarise(measure_records(handle, records))
    print(f"unedited: {json.dumps(unedited)}", file=sys.stderr)
    for method, point in points:
        hp = default_memit_hparams(handle, **point)
        started = time.perf_counter()
        if method == "memit":
            delta = compute_memit(handle, requests, hp, targets=targets(requests, hp))
        else:
            delta, _ = compute_alphaedit(handle, requests, hp, targets=targets(requests, hp))
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
