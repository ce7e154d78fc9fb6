"""``factpatch ledger …``: read, export/import, roll back and revert the ledger directly.

Reads, snapshots and ``rollback`` need only Redis (a rollback's tensor hashes are the target
version's and the base's, kept in the ledger).  ``revert`` makes a new list of edits, whose
tensor hashes are computed on the model, so it loads it (``--model``).  Both write through
:class:`factpatch.ledger.writer.LedgerWriter`, as a running service's LedgerService does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

from factpatch.ledger import Ledger, Version, snapshot
from factpatch.ledger.writer import LedgerWriter
from factpatch.models.options import model_args
from factpatch.store import open_redis


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (default: $FACTPATCH_REDIS_URL)")
    parser.add_argument(
        "--data-dir", help="embedded Redis data dir when no URL (default: $FACTPATCH_DATA_DIR)"
    )
    parser.add_argument(
        "--ledger",
        default=os.environ.get("FACTPATCH_LEDGER", "default"),
        help="ledger name [FACTPATCH_LEDGER] (default: default)",
    )
    parser.add_argument("--json", action="store_true")


def _line(v: Version) -> str:
    when = datetime.datetime.fromtimestamp(v.created, datetime.timezone.utc)
    cause = ", ".join(f"{k}={str(x)[:16]}" for k, x in v.cause.items() if k != "kind")
    return (
        f"{v.number:5d}  {when:%Y-%m-%d %H:%M:%S}Z  {v.cause['kind']:8} {len(v.edits):4d} edits"
        f"  by {v.actor}  {cause}"
    )


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def cmd_ledger(args: argparse.Namespace) -> int:
    with open_redis(args.redis_url, args.data_dir) as client:
        ledger = Ledger(client, args.ledger)
        if args.action == "list":
            versions = ledger.versions()
            data = [json.loads(v.to_json()) for v in versions]
            _emit(args, data, "\n".join(map(_line, versions)))
        elif args.action == "show":
            v = ledger.get(args.version)
            edits = [json.loads(ledger.edit(e).to_json()) for e in v.edits]
            text = _line(v) + "".join(
                f"\n       {e['id'][:16]}  {e['method']}  {json.dumps(e['requests'])}"
                for e in edits
            )
            _emit(args, {**json.loads(v.to_json()), "edit_records": edits}, text)
        elif args.action == "diff":
            d = ledger.diff(args.a, args.b)
            _emit(args, d, json.dumps(d, indent=1))
        elif args.action == "export":
            m = snapshot.export(ledger, args.dir)
            n = len(m["edits"])
            _emit(args, m, f"exported versions 0…{m['head']} ({n} edits) to {args.dir}")
        elif args.action == "export-lora":
            from factpatch.ledger.lora import export_lora

            info = export_lora(ledger, args.version, args.dir)
            ranks = ", ".join(f"{p} ({r})" for p, r in info["modules"].items())
            _emit(
                args,
                info,
                f"version {info['version']} as a LoRA adapter (rank {info['rank']}) in "
                f"{args.dir}: {ranks}",
            )
        elif args.action == "import":
            head = snapshot.import_(ledger, args.dir)
            _emit(args, {"head": head}, f"imported {args.dir}: head is version {head}")
        else:
            return _write(args, ledger)
    return 0


def _write(args: argparse.Namespace, ledger: Ledger) -> int:
    """A rollback needs only the ledger; a revert materialises a new edit list, so it loads
    the model."""
    if args.action == "rollback":
        version = LedgerWriter(ledger).rollback(args.to, actor=args.actor).version
        tainted: list[str] = []
    else:
        from factpatch.models import load_model
        from factpatch.runtime import Replica

        handle = load_model(args.model, device=args.device, dtype=args.dtype)
        writer = LedgerWriter(ledger, Replica(handle, ledger).start())
        commit, tainted = writer.revert(args.edit_id, actor=args.actor)
        version = commit.version
    text = _line(version) + "".join(
        f"\n  note: {e[:16]} was computed on a model containing the reverted edit" for e in tainted
    )
    _emit(args, {**json.loads(version.to_json()), "tainted": tainted}, text)
    return 0


def add_ledger_parser(sub: Any) -> None:
    ledger = sub.add_parser("ledger", help="inspect, export/import, roll back the ledger")
    actions = ledger.add_subparsers(dest="action", required=True)
    _store_args(actions.add_parser("list", help="every version"))
    show = actions.add_parser("show", help="one version and its edits")
    show.add_argument("version", type=int)
    diff = actions.add_parser("diff", help="what changes between two versions")
    diff.add_argument("a", type=int)
    diff.add_argument("b", type=int)
    export = actions.add_parser("export", help="write a verified, portable snapshot")
    export.add_argument("dir")
    lora = actions.add_parser(
        "export-lora", help="write one version as a PEFT LoRA adapter (vLLM, any LoRA server)"
    )
    lora.add_argument("--version", type=int, required=True)
    lora.add_argument("dir")
    imp = actions.add_parser("import", help="load a snapshot into an empty ledger")
    imp.add_argument("dir")
    rollback = actions.add_parser("rollback", help="new version with version N's edits")
    rollback.add_argument("--to", type=int, required=True)
    revert = actions.add_parser("revert", help="new version without one edit")
    revert.add_argument("edit_id")
    for p in (show, diff, export, lora, imp, rollback, revert):
        _store_args(p)
    model_args(revert)  # a rollback needs no model
    for p in (rollback, revert):
        p.add_argument("--actor", default="cli", help="recorded as who asked")
    ledger.set_defaults(func=cmd_ledger)
