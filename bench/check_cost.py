"""What a checked commit adds to an edit: the checks' seconds next to the edit's, side by side.

    python -m bench.check_cost --out bench/results/check_cost.json

Set-up (not timed): a model carrying ``--active`` real ROME edits, applied one after another
(the first validation records; cheap ones: ``--setup-steps`` optimisation passes in bfloat16,
since what the checks cost depends on how many facts they score, not on how well those edits
took), and ``--protected`` protected facts: the first known facts (known_1000) whose answer the
unedited model ranks first — facts it states, as an operator would protect.

Timed, for each of ``--n`` further records: one default ROME edit (``compute_edit`` with the
model's defaults), then the checks of that candidate with the default policy (every check runs:
the edit's prompt and paraphrase, a sample of the earlier facts, every protected fact, the
fluency continuation), then the delta is applied and the next record is edited on top — the
steady state of one worker, whose check cache holds the previous candidate's scores.  The first
check (no cache) is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.edit_speed import machine
from factpatch.checks import DEFAULT_POLICY, FactChecks
from factpatch.checks.scoring import KEEP_TOLERANCE, Checker, Earlier, Protected
from factpatch.editing import apply_delta, compute_edit
from factpatch.editing.delta import output_hook
from factpatch.editing.hparams import default_hparams
from factpatch.evaluation.counterfact import known_facts, load_records, request_for
from factpatch.evaluation.sequential import score_pairs
from factpatch.ledger.ledger import fingerprint
from factpatch.models import load_model
from factpatch.models.hooks import thread_hooks

DATA = "../shared/data/counterfact/counterfact-val.json"
KNOWN = "../shared/data/known/known_1000.json"


def run(args: argparse.Namespace) -> dict:
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    records = load_records(args.data)[: args.active + args.n]
    # Protected facts the model states: known facts whose answer it ranks first, unedited.
    known = [
        {"prompt": k["prompt"], "ground_truth": k["attribute"], "id": str(k["known_id"])}
        for k in json.loads(Path(args.known).read_text())
    ]
    if args.protected_from == "dataset":  # the dataset's answers, stated by the model or not
        chosen = known[: args.protected]
    else:
        chosen = known_facts(handle, known, args.protected)
    protected = [Protected(k["id"], k["prompt"], k["ground_truth"]) for k in chosen]
    cheap = default_hparams(handle, steps=args.setup_steps, optimise_dtype="bfloat16")
    edits: list[str] = []
    earlier: list[Earlier] = []
    started = time.perf_counter()
    for record in records[: args.active]:
        request = request_for(record)
        delta = compute_edit(handle, request, cheap)
        apply_delta(handle, delta)
        edits.append(delta.digest())
        earlier.append(Earlier(edits[-1], request))
    setup = time.perf_counter() - started
    hp = default_hparams(handle)
    checker = Checker(handle)
    rows = []
    for record in records[args.active :]:
        request = request_for(record)
        t0 = time.perf_counter()
        delta = compute_edit(handle, request, hp)
        t1 = time.perf_counter()
        facts = FactChecks((record["rephrase_prompt"],), ())
        before = fingerprint(handle.base_hash, edits)
        after = fingerprint(handle.base_hash, [*edits, delta.digest()])
        report = checker.run(
            delta, [request], [facts], earlier, protected, DEFAULT_POLICY, before, after, after
        )
        t2 = time.perf_counter()
        rows.append(
            {
                "case_id": record["case_id"],
                "edit_s": round(t1 - t0, 3),
                "check_s": round(t2 - t1, 3),
                "ratio": round((t2 - t1) / (t1 - t0), 4),
                "outcome": report["outcome"],
                "failed": report["failed"],
                "scored": {k: c.get("run", 0) for k, c in report["checks"].items()},
                "phases": report["phases"],
                "edit_items": report["checks"]["edit"]["items"],
                "failed_items": [
                    i
                    for c in report["checks"].values()
                    for i in c.get("items", [])
                    if not i["passed"]
                ],
            }
        )
        if args.compare_fp32:
            rows[-1]["keep_vs_fp32"] = _keep_vs_fp32(
                handle, checker, delta, protected, before, after
            )
        print(json.dumps(rows[-1]), flush=True)
        apply_delta(handle, delta)
        edits.append(delta.digest())
        earlier.append(Earlier(edits[-1], request))
    steady = rows[1:]
    return {
        "machine": machine(),
        "model": handle.name,
        "dtype": str(next(handle.model.parameters()).dtype),
        "active_edits": args.active,
        "protected_facts": args.protected,
        "setup_seconds": round(setup, 1),
        "first": rows[0],
        "steady": {
            "n": len(steady),
            "median_edit_s": statistics.median(r["edit_s"] for r in steady),
            "median_check_s": statistics.median(r["check_s"] for r in steady),
            "median_ratio": statistics.median(r["ratio"] for r in steady),
            "max_ratio": max(r["ratio"] for r in steady),
        },
        "failed": {c: sum(c in r["failed"] for r in rows) for c in DEFAULT_POLICY},
        "keep_vs_fp32": {
            "max_gap": max((r["keep_vs_fp32"]["max_gap"] for r in rows), default=None),
            "flips": sum(r["keep_vs_fp32"]["flips"] for r in rows if "keep_vs_fp32" in r),
        },
        "rows": rows,
        "command": "python -m bench.check_cost " + " ".join(args.argv),
    }


def _keep_vs_fp32(
    handle, checker: Checker, delta, protected: list[Protected], before: str, after: str
) -> dict:
    """The protected facts' drops (before − after) as the check scored them (bfloat16 matmuls)
    against float32 forward passes of the same two versions (not timed)."""
    pairs = [(p.prompt, p.answer) for p in protected]
    hooks = [
        (handle.module(path), output_hook(left.float(), right.float()))
        for path, (left, right) in delta.factors.items()
    ]
    exact_before = score_pairs(handle, pairs)
    with thread_hooks(forward=hooks):
        exact_after = score_pairs(handle, pairs)
    gaps, flips = [], 0
    for pair, b, a in zip(pairs, exact_before, exact_after, strict=True):
        drop = checker.cache[(before, "keep", *pair)] - checker.cache[(after, "keep", *pair)]
        gaps.append(abs(drop - (b - a)))
        flips += (drop > KEEP_TOLERANCE) != (b - a > KEEP_TOLERANCE)
    return {
        "max_gap": round(max(gaps), 4),
        "mean_gap": round(sum(gaps) / len(gaps), 4),
        "flips": flips,
    }


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--known", default=KNOWN)
    parser.add_argument("--active", type=int, default=100)
    parser.add_argument("--protected", type=int, default=50)
    parser.add_argument(
        "--protected-from",
        choices=["known", "dataset"],
        default="known",
        help="known: facts the unedited model ranks first; dataset: the first ones, as given",
    )
    parser.add_argument("--setup-steps", type=int, default=4)
    parser.add_argument("--n", type=int, default=6, help="timed edits (the first one is cold)")
    parser.add_argument("--out", default="bench/results/check_cost.json")
    parser.add_argument(
        "--no-compare-fp32",
        dest="compare_fp32",
        action="store_false",
        help="skip comparing the protected facts' drops with float32 passes",
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("steady", "failed", "keep_vs_fp32")}))


if __name__ == "__main__":
    main()
