"""One ROME edit the way it ran before the speed-ups, against today's: side by side on the same
records — seconds, ES/PS/NS, and how far the updates are apart.

    python bench/edit_speed.py --n 50 --out bench/results/edit_speed_val.jsonl
    python bench/edit_speed.py --summary bench/results/edit_speed_val.jsonl

Settings (``--settings``, comma-separated):

* ``unpacked``: the model's dtype, every optimisation pass over every position (the code before
  the packed passes of factpatch/editing/packed.py: ``compute_edit(..., packed=False)``);
* ``model``: the model's dtype, packed passes (the same δ up to float rounding);
* ``bfloat16`` / ``auto`` / …: ``optimise_dtype``, packed passes.

Per record, every setting is edited on a fresh copy of the base weights, one after the other
(so all see the same machine load); one JSON line per record.  The summary gives, per setting,
ES/PS/NS, the median seconds per edit, the median ratio of its seconds to the first setting's on
the same record, and how many records keep all three verdicts of the first setting.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from factpatch.editing import base_weights, compute_edit, load_weights, materialize
from factpatch.editing.hparams import default_hparams
from factpatch.evaluation.counterfact import load_records, measure, request_for, summarise
from factpatch.models import load_model

DATA = "../shared/data/counterfact/counterfact-val.json"


UNPACKED = "unpacked"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for row in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if row.startswith("model name"):
            cpu = row.split(":", 1)[1].strip()
            break
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(args: argparse.Namespace) -> None:
    handle = load_model(args.model, device=args.device)
    records = load_records(args.data)[args.offset : args.offset + args.n]
    settings = args.settings.split(",")
    hps = {
        name: default_hparams(handle, optimise_dtype="model" if name == UNPACKED else name)
        for name in settings
    }
    path = handle.adapter.rewrite_path(hps[settings[0]].layer)
    base = base_weights(handle, [path])
    compute_edit(handle, request_for(records[0]), hps[settings[0]])  # covariance, templates
    with open(args.out, "a") as out:
        for record in records:
            line = {"case_id": record.get("case_id"), "machine": machine()}
            updates = {}
            for name in settings:
                started = time.perf_counter()
                delta = compute_edit(
                    handle, request_for(record), hps[name], packed=name != UNPACKED
                )
                seconds = time.perf_counter() - started
                left, right = delta.factors[path]
                updates[name] = (left.double() @ right.double().T).flatten()
                load_weights(handle, materialize(handle, base, [delta]))
                line[name] = {
                    "seconds": seconds,
                    "steps": delta.provenance["stats"][0]["steps"],
                    "scores": measure(handle, record),
                }
                load_weights(handle, base)
            first = updates[settings[0]]
            for name in settings[1:]:
                other = updates[name]
                line[name]["update_cosine"] = float(other @ first / (other.norm() * first.norm()))
                line[name]["update_norm_ratio"] = float(other.norm() / first.norm())
            out.write(json.dumps(line) + "\n")
            out.flush()
            print(
                record.get("case_id"),
                " ".join(f"{name} {line[name]['seconds']:.1f}s" for name in settings),
                flush=True,
            )


def _outcomes(scores: dict[str, float]) -> tuple[bool, bool, bool]:
    return (
        scores["rewrite_new"] > scores["rewrite_true"],
        scores["para_new"] > scores["para_true"],
        scores["nb_true"] > scores["nb_new"],
    )


def summary(paths: list[str]) -> dict:
    lines = [
        json.loads(row) for path in paths for row in Path(path).read_text().splitlines() if row
    ]
    settings = [k for k in lines[0] if isinstance(lines[0][k], dict)]
    table = {"records": len(lines), "machine": lines[0]["machine"], "settings": {}}
    for name in settings:
        row = summarise([line[name]["scores"] for line in lines])
        row["median_seconds"] = statistics.median(line[name]["seconds"] for line in lines)
        row["median_ratio_to_first"] = statistics.median(
            line[name]["seconds"] / line[settings[0]]["seconds"] for line in lines
        )
        row["same_outcomes"] = sum(
            _outcomes(line[name]["scores"]) == _outcomes(line[settings[0]]["scores"])
            for line in lines
        )  # records whose ES, PS and NS verdicts all equal the first setting's
        if "update_cosine" in lines[0][name]:
            row["update_cosine_min"] = min(line[name]["update_cosine"] for line in lines)
            row["update_cosine_median"] = statistics.median(
                line[name]["update_cosine"] for line in lines
            )
        table["settings"][name] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", help="default: CUDA when present")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--settings", default="unpacked,model,bfloat16")
    parser.add_argument("--out", default="bench/results/edit_speed_val.jsonl")
    parser.add_argument("--summary", nargs="+", help="summarise these JSONL files and exit")
    args = parser.parse_args()
    if args.summary:
        print(json.dumps(summary(args.summary), indent=2))
        return
    run(args)


if __name__ == "__main__":
    main()
