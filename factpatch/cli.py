"""The ``factpatch`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch

from factpatch.editing.prompts import continuation_logprobs
from factpatch.models.loading import ModelHandle
from factpatch.models.options import load_from_args, model_args


def _hparam_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", type=int, help="edited layer (default: the model's default)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any ROME hyperparameter, e.g. --set kl_factor=0.5 (repeatable)",
    )
    parser.add_argument("--corpus", help="text/JSONL file for covariance statistics")


def _hparams(handle: ModelHandle, args: argparse.Namespace):
    from factpatch.editing import default_hparams

    overrides = set_overrides(args.set)
    if args.layer is not None:
        overrides["layer"] = args.layer
    return default_hparams(handle, **overrides)


def set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items: VALUE as JSON (numbers, lists, true), else the plain string
    (``--set key_mode=original``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@torch.no_grad()
def _top_next(handle: ModelHandle, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"].to(handle.device)
    probs = torch.softmax(handle.model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
    top = probs.topk(k)
    return [
        (handle.tokenizer.decode([int(i)]), float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]


@torch.no_grad()
def _greedy(handle: ModelHandle, prompt: str, n: int = 12) -> str:
    ids = handle.tokenizer(prompt, return_tensors="pt").to(handle.device)
    out = handle.model.generate(**ids, max_new_tokens=n, do_sample=False)
    return handle.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _snapshot(handle: ModelHandle, prompt: str, targets: dict[str, str]) -> dict[str, Any]:
    pairs = [(prompt, t) for t in targets.values()]
    logps = continuation_logprobs(handle.model, handle.tokenizer, pairs, handle.device)
    return {
        "completion": _greedy(handle, prompt),
        "top_next": _top_next(handle, prompt),
        **{f"p_{name}": math.exp(lp) for name, lp in zip(targets, logps, strict=True)},
    }


def cmd_edit(args: argparse.Namespace) -> int:
    from factpatch.editing import EditRequest, apply_delta, compute_edit

    request = EditRequest.from_prompt(args.prompt, args.subject, args.target, args.old)
    handle = load_from_args(args)
    hp = _hparams(handle, args)
    prompt = request.text
    old = args.old or _greedy(handle, prompt, 3).strip().split(" ")[0].strip(",.;:")
    targets = {"target": request.target, "old": old}
    before = _snapshot(handle, prompt, targets)
    delta = compute_edit(handle, request, hp, corpus=args.corpus)
    apply_delta(handle, delta)
    after = _snapshot(handle, prompt, targets)
    path, (left, right) = next(iter(delta.factors.items()))
    report = {
        "model": handle.name,
        "prompt": prompt,
        "target": request.target,
        "old": old,
        "module": path,
        "update_norm": float(left.norm() * right.norm()),
        "update_ratio": delta.provenance["stats"][0]["update_ratio"],
        "steps": delta.provenance["stats"][0]["steps"],
        "seconds": {
            "setup": delta.provenance["seconds"]["setup"],
            **delta.provenance["stats"][0]["seconds"],
            "total": delta.provenance["seconds"]["total"],
        },
        "before": before,
        "after": after,
    }
    if args.save:
        delta.save(args.save)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{prompt!r}: {old!r} -> {request.target!r}  (model {handle.name}, {path})")
    for label, snap in (("before", before), ("after", after)):
        print(f"  {label:6} … {snap['completion']!r}")
        print(f"         P({request.target})={snap['p_target']:.4f}  P({old})={snap['p_old']:.4f}")
        tops = ", ".join(f"{t!r} {p:.3f}" for t, p in snap["top_next"])
        print(f"         next: {tops}")
    print(
        f"  update ‖ΔW‖={report['update_norm']:.3f} (‖ΔW‖/‖W‖={report['update_ratio']:.3f}), "
        f"{report['steps']} steps"
    )
    print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from factpatch.evaluation.counterfact import as_facts, evaluate, known_facts, load_records

    if args.sequential is not None or args.method != "rome":
        return _cmd_eval_sequential(args)
    handle = load_from_args(args)
    hp = _hparams(handle, args)
    data = load_records(args.data)
    if args.known_facts:
        records = known_facts(handle, data, args.n)
    else:
        records = data[: args.n] if args.n else data  # as load_records(path, n)
    text = args.text or args.known is not None
    # The subject's other facts: the known set's and the data's own.
    known = None
    if text:
        known = (load_records(args.known) if args.known else []) + as_facts(data)
    evaluation = evaluate(
        handle, records, hp, corpus=args.corpus, progress=not args.quiet, text=text, known=known
    )
    report = evaluation.report()
    report.update(model=handle.name, layer=hp.layer, hparams=hp.to_dict(), data=args.data)
    if args.out:
        details = [r.__dict__ for r in evaluation.records]
        with open(args.out, "w") as f:
            json.dump({"summary": report, "records": details}, f, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        u = report["unedited"]
        print(f"CounterFact, {report['n']} records, model {handle.name}, layer {hp.layer}")
        for key in ("efficacy", "paraphrase", "neighborhood", "score"):
            print(f"  {key:13} {report[key]:6.1f}   (unedited {u[key]:6.1f})")
        if "text" in report:
            t = report["text"]
            for key in ("fluency_greedy", "fluency_sampled", "degenerate"):
                print(f"  {key:16} {t[key]['after']:6.3f}   (unedited {t[key]['before']:6.3f})")
            c = t["consistency"]
            print(
                f"  consistency      {c['after_new']:6.3f}   "
                f"(unedited, true object {c['before_true']:6.3f})"
            )
            if t["essence_kept"] is not None:
                print(
                    f"  essence kept     {t['essence_kept']:6.3f}   ({t['essence_probes']} probes)"
                )
        print(
            f"  seconds/edit  mean {report['seconds_per_edit']:.2f}, "
            f"median {report['median_seconds_per_edit']:.2f}; refused {report['refused']}"
        )
    return 0


def _cmd_eval_sequential(args: argparse.Namespace) -> int:
    """``--sequential N --batch B``: N edits applied cumulatively (evaluation/sequential.py)."""
    from factpatch.editing import default_memit_hparams
    from factpatch.evaluation.counterfact import load_records
    from factpatch.evaluation.sequential import evaluate_sequential

    if args.sequential is None:
        raise ValueError(f"--method {args.method}: give --sequential N (and --batch B)")
    handle = load_from_args(args)
    if args.method == "rome":
        hp = _hparams(handle, args)
    else:
        if args.layer is not None:
            raise ValueError("--layer: MEMIT/AlphaEdit take --set layers=[...]")
        hp = default_memit_hparams(handle, **set_overrides(args.set))
    records = load_records(args.data, args.sequential)
    report = evaluate_sequential(
        handle,
        records,
        args.method,
        hp,
        batch=args.batch or len(records),
        corpus=args.corpus,
        checkpoint=args.checkpoint,
        max_batches=args.max_batches,
        progress=not args.quiet,
        gate=args.gate,
    )
    report.update(model=handle.name, data=args.data)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        u = report["unedited"]
        n, batch = report["n_edits"], report["batch"]
        print(f"CounterFact, {n} sequential edits ({args.method}), batch {batch}")
        for point in report["curve"]:
            print(
                f"  after {point['n_edits']:5d}: ES {point['efficacy']:5.1f} PS "
                f"{point['paraphrase']:5.1f} NS {point['neighborhood']:5.1f}"
            )
        print(f"  unedited (all {len(records)}): NS {u['neighborhood']:.1f}")
        if "fluency" in report:
            print(
                f"  fluency {report['fluency']['ngram_entropy']:.3f} "
                f"(unedited {report['unedited_fluency']['ngram_entropy']:.3f}); perplexity "
                f"{report['perplexity']:.2f} (unedited {report['unedited_perplexity']:.2f})"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factpatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit one fact with ROME and show before/after")
    model_args(edit)
    _hparam_args(edit)
    edit.add_argument("--prompt", required=True, help='e.g. "{} is located in the city of"')
    edit.add_argument("--subject", required=True)
    edit.add_argument("--target", required=True, help="the new object, e.g. Rome")
    edit.add_argument("--old", help="the answer being replaced (default: the model's own)")
    edit.add_argument("--save", metavar="DIR", help="write the delta (safetensors + JSON)")
    edit.add_argument("--json", action="store_true")
    edit.set_defaults(func=cmd_edit)

    evaluate = sub.add_parser("eval", help="evaluate edits on a benchmark")
    bench = evaluate.add_subparsers(dest="benchmark", required=True)
    cf = bench.add_parser("counterfact", help="single-edit CounterFact (Meng et al. 2022)")
    model_args(cf)
    _hparam_args(cf)
    cf.add_argument("--data", required=True, help="CounterFact JSON (flat KnowEdit layout)")
    cf.add_argument("--n", type=int, help="first N records")
    cf.add_argument("--json", action="store_true", help="print one JSON object")
    cf.add_argument("--out", help="also write the per-record results here")
    cf.add_argument("--quiet", action="store_true", help="no per-record progress")
    cf.add_argument(
        "--text",
        action="store_true",
        help="also judge generated text: fluency, degeneration, consistency, essence (slower)",
    )
    cf.add_argument(
        "--known",
        metavar="PATH",
        help="known-facts JSON: its facts about a subject join the essence probes (implies --text)",
    )
    cf.add_argument(
        "--known-facts",
        action="store_true",
        help="only records whose true object the unedited model ranks first (--n of them)",
    )
    cf.add_argument("--method", choices=["rome", "memit", "alphaedit"], default="rome")
    cf.add_argument("--sequential", type=int, metavar="N", help="apply N edits cumulatively")
    cf.add_argument("--batch", type=int, metavar="B", help="edits per batch (default: N)")
    cf.add_argument("--checkpoint", metavar="DIR", help="save/resume a sequential run here")
    cf.add_argument("--max-batches", type=int, help="stop after this many batches (resumable)")
    cf.add_argument(
        "--gate",
        type=float,
        metavar="TAU",
        help="with --sequential: measure as served with key-gated edits (editing/gate.py)",
    )
    cf.set_defaults(func=cmd_eval)

    from factpatch.ledger.cli import add_ledger_parser

    add_ledger_parser(sub)
    _add_service_parsers(sub)
    from factpatch.tracing.cli import add_trace_parser

    add_trace_parser(sub)
    return parser


def _add_service_parsers(sub: Any) -> None:
    from factpatch.client.cli import add_client_parser, add_tokens_parser
    from factpatch.config import Settings, add_options

    def run(role: str) -> Any:
        def start(args: argparse.Namespace) -> int:
            from factpatch import service

            entry = {
                "server": service.run_server,
                "worker": service.run_worker,
                "up": service.run_up,
            }
            return entry[role](Settings.from_args(args))

        return start

    helps = {
        "up": "all-in-one on this machine: embedded Redis, a server and a worker",
        "server": "a gRPC server (one model replica) against --redis-url",
        "worker": "a worker (edit and trace jobs) against --redis-url",
    }
    for role, text in helps.items():
        parser = sub.add_parser(role, help=text)
        add_options(parser, role)
        if role == "up":
            parser.add_argument("--tour", action="store_true", help="run the worked example")
        parser.set_defaults(func=run(role))
    add_client_parser(sub)
    add_tokens_parser(sub)


def main(argv: list[str] | None = None) -> int:
    from factpatch.editing import DegenerateEditError
    from factpatch.ledger import LedgerError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: say which field, change nothing
        print(f"factpatch: error: {err}", file=sys.stderr)
        return 2
    except DegenerateEditError as err:  # computed, judged unsafe, not applied
        print(f"factpatch: refused: {err}", file=sys.stderr)
        return 3
    except LedgerError as err:  # stale head, unknown version, corrupt or mismatched data
        print(f"factpatch: ledger: {err}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
