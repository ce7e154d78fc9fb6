"""How long one causal trace takes, batched (factpatch) against one forward per restoration.

    flock /tmp/fp-heavy.lock python -m bench.trace_speed [--model gemma-3-270m] \\
        [--naive hidden] [--out bench/results/trace_speed.json]

Reports, for one prompt at the paper's settings (10 noise samples, window 10):
* seconds of ``trace`` for each kind alone, and of ``trace_kinds`` for all three at once;
* side by side for the kinds named by ``--naive``: the plain computation of
  ``tests/reference_trace.py`` (the paper's reference method: for each (token, layer), one
  forward of [clean row, 10 corrupted rows] over the whole prompt with the model's own LM head),
  its seconds, the ratio, and the largest difference between the two effect matrices;
* with ``--compare-dtype``, all three kinds again on a copy of the model in that dtype (say a
  bfloat16 run against float32): its seconds, the ratio, the largest effect difference;
* one-time costs: model load, the noise-level measurement (or its cache read).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from factpatch.models import load_model
from factpatch.models.options import model_args
from factpatch.tracing import KINDS, trace, trace_kinds
from factpatch.tracing.noise import subject_embedding_std
from tests.reference_trace import trace_reference

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_args(parser)  # --model, --device, --dtype
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--subject", default=SUBJECT)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--naive", nargs="*", default=["hidden"], choices=KINDS)
    parser.add_argument(
        "--compare-dtype",
        help="also trace all three kinds on a copy of the model in this dtype (e.g. float32) "
        "and report its seconds and the largest effect difference",
    )
    parser.add_argument("--out", default="bench/results/trace_speed.json")
    args = parser.parse_args()
    settings = dict(samples=args.samples, window=args.window)

    handle, load_s = timed(load_model, args.model, device=args.device, dtype=args.dtype)
    _, noise_s = timed(subject_embedding_std, handle)
    trace(handle, args.prompt, args.subject, samples=1, noise=0.0)  # warm-up
    report: dict[str, Any] = {
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(handle.device),
            "dtype": str(handle.dtype).removeprefix("torch."),
        },
        "model": args.model,
        "prompt": args.prompt,
        "subject": args.subject,
        "settings": settings,
        "one_time_seconds": {"load_model": round(load_s, 2), "noise_level": round(noise_s, 3)},
        "batched_seconds": {},
        "naive": {},
    }
    results = {}
    for kind in KINDS:
        results[kind], seconds = timed(
            trace, handle, args.prompt, args.subject, kind=kind, **settings
        )
        report["batched_seconds"][kind] = round(seconds, 2)
        print(f"{kind:6} batched {seconds:6.1f} s", flush=True)
    _, seconds = timed(trace_kinds, handle, args.prompt, args.subject, **settings)
    report["batched_seconds"]["all_three_together"] = round(seconds, 2)
    print(f"all three kinds in one call {seconds:6.1f} s", flush=True)
    first = results["hidden"]
    report["trace"] = {
        "tokens": first.tokens,
        "subject_range": list(first.subject_range),
        "answer": first.answer,
        "clean": first.clean,
        "corrupted": first.corrupted,
        "strongest": {k: list(r.strongest()) for k, r in results.items()},
    }
    if args.compare_dtype:
        other = load_model(args.model, device=args.device, dtype=args.compare_dtype)
        subject_embedding_std(other)
        trace(other, args.prompt, args.subject, samples=1, noise=0.0)  # warm-up
        theirs, seconds = timed(trace_kinds, other, args.prompt, args.subject, **settings)
        ours = trace_kinds(handle, args.prompt, args.subject, **settings)
        diffs = {k: float((ours[k].matrix - theirs[k].matrix).abs().max()) for k in KINDS}
        ratio = report["batched_seconds"]["all_three_together"] / seconds
        report["compared_dtype"] = {
            "dtype": args.compare_dtype,
            "all_three_together_seconds": round(seconds, 2),
            "ratio_this_over_compared": round(ratio, 3),
            "max_abs_difference": diffs,
            "strongest": {k: list(r.strongest()) for k, r in theirs.items()},
        }
        print(f"{args.compare_dtype} all three kinds {seconds:6.1f} s; this/that {ratio:.2f}")
        print(f"max |effect difference| {diffs}", flush=True)
        del other
    for kind in args.naive:
        slow, seconds = timed(
            trace_reference, handle, args.prompt, args.subject, kind=kind, **settings
        )
        diff = float((slow.matrix - results[kind].matrix).abs().max())
        ratio = seconds / report["batched_seconds"][kind]
        report["naive"][kind] = {
            "seconds": round(seconds, 2),
            "ratio_naive_over_batched": round(ratio, 2),
            "max_abs_difference": diff,
        }
        print(
            f"{kind:6} naive   {seconds:6.1f} s  ({ratio:.1f}x; max |diff| {diff:.2e})", flush=True
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
