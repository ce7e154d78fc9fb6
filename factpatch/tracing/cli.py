"""``factpatch trace``: causal tracing (Meng et al. 2022, section 2) from the command line.

    factpatch trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --out trace.png
    factpatch trace --dataset ../shared/data/known/known_1000.json --n 40 --out traces/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from factpatch.models.options import load_from_args, model_args
from factpatch.tracing.core import KINDS, TraceResult, trace_kinds


def add_trace_parser(subparsers: Any) -> None:
    """Register ``trace`` on the ``factpatch`` sub-command parsers."""
    trace = subparsers.add_parser(
        "trace",
        help="causal tracing: which states carry a fact (Meng et al. 2022)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_args(trace)
    trace.add_argument("--prompt", help="text containing the subject, or a template with {}")
    trace.add_argument("--subject", help="the subject, as it appears in the prompt")
    trace.add_argument("--answer", help="expected answer (default: the greedy next token)")
    trace.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    trace.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    trace.add_argument("--window", type=int, default=10, help="mlp/attn layers restored")
    trace.add_argument("--noise", type=float, help="noise std (default 3 × subject-embedding std)")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--out", help="one prompt: image file (.png); --dataset: a directory")
    trace.add_argument("--json", action="store_true", help="print JSON")
    trace.add_argument("--dataset", help="known-facts JSON: average over its facts (figure 2)")
    trace.add_argument("--n", type=int, help="--dataset: the first N records")
    trace.add_argument(
        "--known", type=int, help="--dataset: stop after K traced facts (the first K known)"
    )
    trace.add_argument(
        "--include-unknown", action="store_true", help="--dataset: also facts the model gets wrong"
    )
    trace.add_argument("--quiet", action="store_true", help="--dataset: no per-fact progress")
    trace.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.dataset:
        return _dataset(args, kinds)
    if not args.prompt or not args.subject:
        raise ValueError("prompt, subject: give --prompt and --subject (or --dataset)")
    from factpatch.tracing.plots import plot_traces

    handle = load_from_args(args)
    results = trace_kinds(
        handle,
        args.prompt,
        args.subject,
        args.answer,
        kinds,
        samples=args.samples,
        window=args.window,
        noise=args.noise,
        seed=args.seed,
    )
    if args.out:
        plot_traces(list(results.values()), args.out)
    if args.json:
        print(json.dumps({kind: r.to_dict() for kind, r in results.items()}, indent=1))
    else:
        _print_summary(list(results.values()), args.out)
    return 0


def _print_summary(results: list[TraceResult], out: str | None) -> None:
    first = results[0]
    start, end = first.subject_range
    settings = first.settings
    print(f"{first.prompt!r} -> {first.answer!r}  (model {settings['model']})")
    print(f"  subject tokens {start}..{end - 1}: {first.tokens[start:end]}")
    print(
        f"  p clean {first.clean:.4f}, corrupted {first.corrupted:.4f}  "
        f"({settings['samples']} samples, noise std {settings['noise']:.4g}, "
        f"{settings['noise_source']['source']})"
    )
    for result in results:
        token, layer = result.strongest()
        print(
            f"  {result.kind:6} strongest effect {float(result.matrix[token, layer]):+.4f} "
            f"at token {token} {result.tokens[token]!r}, layer {layer}"
        )
    print(f"  seconds {settings['seconds']:.1f}" + (f"; wrote {out}" if out else ""))


def _dataset(args: argparse.Namespace, kinds: list[str]) -> int:
    from factpatch.tracing.dataset import LAST_SUBJECT, load_known, stderr_progress, trace_dataset
    from factpatch.tracing.plots import plot_averages, plot_last_subject

    if not args.out:
        raise ValueError("out: --dataset needs --out DIR for the figures and the JSON")
    facts = load_known(args.dataset, args.n)
    handle = load_from_args(args)
    averages, summary = trace_dataset(
        handle,
        facts,
        kinds,
        only_known=not args.include_unknown,
        progress=None if args.quiet else stderr_progress,
        max_kept=args.known,
        samples=args.samples,
        window=args.window,
        noise=args.noise,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": handle.name, "dataset": args.dataset, **summary}
    if averages:
        report["peaks_last_subject_token"] = {
            kind: {"layer": a.peak_layer(), "effect": float(a.matrix[LAST_SUBJECT].max())}
            for kind, a in averages.items()
        }
        report["averages"] = {kind: a.to_dict() for kind, a in averages.items()}
        plot_averages(list(averages.values()), out / "average_effects.png")
        plot_last_subject(list(averages.values()), out / "average_last_subject.png")
    (out / "trace_averages.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{summary['n_kept']} of {summary['n_total']} facts known by {handle.name} and traced")
    for kind, peak in report.get("peaks_last_subject_token", {}).items():
        effect = peak["effect"]
        print(f"  {kind:6} last subject token peaks at layer {peak['layer']} ({effect:+.4f})")
    print(f"  seconds {summary['seconds']:.0f}; wrote {out}")
    return 0
