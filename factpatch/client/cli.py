"""``factpatch client …``: the SDK on the command line (progress shown; ``--json`` for scripts)."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor


def _dict(message: Any) -> dict[str, Any]:
    """A message as plain JSON: every field present (zeros too), integers as numbers, enums by
    name, bytes in base64, the proto field names.  (Protobuf's own JSON mapping writes int64 as
    strings and leaves zero values out.)"""
    return {f.name: _value(f, getattr(message, f.name)) for f in message.DESCRIPTOR.fields}


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {k: _scalar(value_field, v) for k, v in value.items()}
    if field.is_repeated:
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return _dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _client(args: argparse.Namespace) -> Any:
    from factpatch.client.sdk import TLS, Client

    tls = None
    if args.tls_ca or args.tls_cert:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        tls = TLS(read(args.tls_ca), read(args.tls_cert), read(args.tls_key))
    token = args.token or os.environ.get("FACTPATCH_TOKEN") or _local_admin_token()
    return Client(args.target, token=token, tls=tls, timeout=args.timeout)


def _local_admin_token() -> str | None:
    """The all-in-one's generated admin token, when this machine runs ``factpatch up``."""
    from factpatch.paths import default_data_dir

    path = default_data_dir() / "admin.token"
    return path.read_text().strip() if path.exists() else None


def _version_line(v: Any) -> str:
    when = datetime.datetime.fromtimestamp(v.created, datetime.timezone.utc)
    return (
        f"{v.number:5d}  {when:%Y-%m-%d %H:%M:%S}Z  {v.cause:8} {len(v.edit_ids):4d} edits"
        f"  by {v.actor}"
    )


def _progress(job: Any) -> None:
    from factpatch.rpc import pb

    state = pb.JobState.Name(job.state).lower()
    phase = f" {job.phase}" if job.phase else ""
    print(f"  job {job.id[:12]} {state}{phase}", file=sys.stderr, flush=True)


def _facts(args: argparse.Namespace) -> list[dict[str, str]]:
    """The facts of ``client edit``: one from the flags, or a file's list."""
    single = (args.prompt, args.subject, args.fact_target)
    if args.facts:
        if any(single):
            raise SystemExit("client edit: give --facts or --prompt/--subject/--target, not both")
        text = Path(args.facts).read_text()
        stripped = text.lstrip()
        rows = (
            json.loads(text)
            if stripped.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        fields = ("prompt", "subject", "target", "old")
        lists = ("paraphrases", "neighbours")
        return [
            {
                **{k: str(r[k]) for k in fields if r.get(k)},
                **{k: [str(p) for p in r[k]] for k in lists if r.get(k)},
            }
            for r in rows
        ]
    if not all(single):
        raise SystemExit("client edit: --prompt, --subject and --target are required")
    return [
        {
            "prompt": args.prompt,
            "subject": args.subject,
            "target": args.fact_target,
            "old": args.old or "",
            "paraphrases": args.paraphrase,
            "neighbours": args.neighbour,
        }
    ]


def _checks_line(result_json: str) -> str:
    """``checks passed`` / ``checks warned: earlier, fluency`` from a job's result."""
    report = json.loads(result_json or "{}").get("checks")
    if not report:
        return ""
    failed = ", ".join(report["failed"])
    return f"; checks {report['outcome']}" + (f": {failed}" if failed else "")


def _diff(client: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Greedy answers to every prompt of a file at two versions (per-request versions: both
    from the same live server, neither made live)."""
    text = Path(args.prompts).read_text()
    if text.lstrip().startswith("["):
        prompts = [str(p) for p in json.loads(text)]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"client diff: --prompts {args.prompts} has no prompt")
    rows = []
    for prompt in prompts:
        a, b = (
            client.generate(prompt, max_new_tokens=args.max_new_tokens, version=v).text
            for v in (args.version_from, args.version_to)
        )
        rows.append({"prompt": prompt, "a": a, "b": b, "changed": a != b})
    return rows


def cmd_client(args: argparse.Namespace) -> int:
    from factpatch.client.sdk import JobFailed
    from factpatch.rpc import pb

    client = _client(args)
    out: Any
    status = 0
    if args.verb == "edit":
        handle = client.submit_edits(
            _facts(args), args.idempotency_key, method=args.method or "rome", checks=args.checks
        )
        try:
            job = (
                handle.job
                if args.no_wait
                else handle.wait(on_update=None if args.json else _progress)
            )
        except JobFailed as failed:  # e.g. a check refused the commit: the report is kept
            job, status = failed.job, 1
        out = _dict(job)
        text = f"job {job.id}: {pb.JobState.Name(job.state).lower()}"
        if job.state == pb.SUCCEEDED:
            text += f", version {job.version} committed"
        text += _checks_line(job.result_json) + (f"\n  {job.error}" if job.error else "")
    elif args.verb == "protect":
        if args.action == "add":
            if not (args.prompt and args.answer):
                raise SystemExit("client protect add: --prompt and --answer are required")
            fact = client.protect(args.prompt, args.answer)
            out, text = _dict(fact), f"protected {fact.id}: {fact.prompt!r} → {fact.answer!r}"
        elif args.action == "remove":
            if not args.id:
                raise SystemExit("client protect remove: --id is required")
            fact = client.unprotect(args.id)
            out, text = _dict(fact), f"no longer protected: {fact.id}"
        else:
            facts = client.protected()
            out = [_dict(f) for f in facts]
            text = "\n".join(f"{f.id}  {f.prompt!r} → {f.answer!r}  by {f.actor}" for f in facts)
    elif args.verb == "generate":
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        g = client.generate(args.prompt, seed=args.seed, version=args.version, **sampling)
        out = g.__dict__
        text = f"[version {g.version}] {args.prompt}{g.text}"
    elif args.verb == "diff":
        out = _diff(client, args)
        text = "\n".join(
            f"{row['prompt']}\n  v{args.version_from}: {row['a']}\n  v{args.version_to}: {row['b']}"
            + ("" if row["changed"] else "   (same)")
            for row in out
        )
        changed = sum(row["changed"] for row in out)
        text += f"\n{changed} of {len(out)} answers differ between v{args.version_from} and "
        text += f"v{args.version_to}"
    elif args.verb == "score":
        s = client.score(args.prompt, args.continuation)
        out = _dict(s)
        text = f"[version {s.version}] log P = {s.logprob:.4f}"
    elif args.verb == "trace":
        handle = client.trace(args.prompt, args.subject, kind=args.kind, render_png=bool(args.out))
        job = handle.wait(on_update=None if args.json else _progress)
        if args.out:
            with open(args.out, "wb") as f:
                f.write(job.trace.png)
        out = _dict(job.trace)
        out.pop("png", None)
        text = (
            f"[version {job.trace.version}] clean P={job.trace.clean:.4f} "
            f"corrupted P={job.trace.corrupted:.4f}"
            + (f"; heatmap: {args.out}" if args.out else "")
        )
    elif args.verb == "ledger":
        versions = client.versions(args.start, args.limit)
        out = [{**_dict(v), "checks": json.loads(v.checks_json or "null")} for v in versions]
        text = "\n".join(_version_line(v) for v in versions)
    elif args.verb == "rollback":
        change = client.rollback(args.to)
        out = _dict(change)
        text = f"version {change.version.number}: edits of version {args.to}"
    elif args.verb == "revert":
        change = client.revert(args.edit_id)
        out = _dict(change)
        text = f"version {change.version.number}: without {args.edit_id[:16]}" + "".join(
            f"\n  note: {e[:16]} was computed on a model containing it" for e in change.tainted
        )
    elif args.verb == "replicas":
        replicas = client.replicas()
        out = [_dict(r) for r in replicas]
        now = time.time()
        text = "\n".join(
            f"{r.server}  v{r.version}  {'ready' if r.ready else 'NOT READY ' + r.fault}  "
            f"reported {now - r.seen:.0f} s ago"
            for r in replicas
        )
    elif args.verb == "jobs":
        jobs = client.jobs(args.kind, args.limit)
        out = [_dict(j) for j in jobs]
        text = "\n".join(
            f"{j.id}  {j.kind:5}  {pb.JobState.Name(j.state).lower():9}  v{j.version}  {j.error}"
            for j in jobs
        )
    else:  # job
        job = client.job(args.job_id)
        out, text = _dict(job), json.dumps(_dict(job), indent=1)
    print(json.dumps(out, indent=1) if args.json else text)
    client.close()
    return status


def _connection_options(parser: argparse.ArgumentParser, defaults: bool, target: bool) -> None:
    """The options of every verb.  On ``client`` they carry the defaults; on each verb they
    default to SUPPRESS, so that one given before the verb is not reset by the verb's parser
    (``client --json ledger`` and ``client ledger --json`` both work)."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    if target:  # not on ``edit``, whose --target is the fact's new object
        parser.add_argument(
            "--target",
            default=d(os.environ.get("FACTPATCH_TARGET", "127.0.0.1:50051")),
            help="server address host:port",
        )
    parser.add_argument("--token", default=d(None), help="bearer token ($FACTPATCH_TOKEN)")
    parser.add_argument("--tls-ca", default=d(None), help="CA certificate (PEM) of the server")
    parser.add_argument("--tls-cert", default=d(None), help="client certificate (PEM), mTLS")
    parser.add_argument("--tls-key", default=d(None), help="client key (PEM), mutual TLS")
    parser.add_argument("--timeout", type=float, default=d(60.0), help="per-call deadline (s)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print plain JSON")


def add_client_parser(sub: Any) -> None:
    client = sub.add_parser("client", help="talk to a running factpatch service")
    _connection_options(client, defaults=True, target=True)
    verbs = client.add_subparsers(dest="verb", required=True)

    def verb(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, **kwargs)
        _connection_options(parser, defaults=False, target=name != "edit")
        return parser

    edit = verb("edit", help="correct a fact (or a file of facts); waits for the commit")
    edit.add_argument("--prompt", help='e.g. "{} is located in the city of"')
    edit.add_argument("--subject")
    # dest differs from the connection's --target (set before the verb), which it would clobber
    edit.add_argument("--target", dest="fact_target", help="the new object, e.g. Rome")
    edit.add_argument("--old")
    edit.add_argument(
        "--facts",
        help="JSON list or JSON-lines file of {prompt, subject, target[, old, paraphrases, "
        "neighbours]}: one job, one version (instead of --prompt/--subject/--target)",
    )
    edit.add_argument(
        "--paraphrase",
        action="append",
        default=[],
        help="another prompt for the fact, with the subject (repeat); checked before commit",
    )
    edit.add_argument(
        "--neighbour",
        action="append",
        default=[],
        help="a prompt whose answer must not change (repeat); checked before commit",
    )
    edit.add_argument(
        "--checks",
        default="",
        help='check policy over the server\'s: "warn", "protected=enforce,fluency=off", …',
    )
    edit.add_argument("--method", help="rome (default) | memit | alphaedit")
    edit.add_argument("--idempotency-key", default="")
    edit.add_argument("--no-wait", action="store_true")

    gen = verb("generate", help="complete a prompt (prints the version)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--version", type=int, help="answer from this committed version (default: the live one)"
    )

    diff = verb("diff", help="answers to a prompt file at two versions, side by side")
    diff.add_argument("--from", dest="version_from", type=int, required=True)
    diff.add_argument("--to", dest="version_to", type=int, required=True)
    diff.add_argument("--prompts", required=True, help="text file (one per line) or JSON list")
    diff.add_argument("--max-new-tokens", type=int, default=16)

    score = verb("score", help="log-probability of a continuation")
    score.add_argument("prompt")
    score.add_argument("continuation", help='appended as given, e.g. " Rome"')

    trace = verb("trace", help="causal trace of a fact")
    trace.add_argument("--prompt", required=True)
    trace.add_argument("--subject", required=True)
    trace.add_argument("--kind", default="hidden", choices=["hidden", "mlp", "attn"])
    trace.add_argument("--out", help="write the heatmap PNG here")

    ledger = verb("ledger", help="list versions")
    ledger.add_argument("--start", type=int, default=0)
    ledger.add_argument("--limit", type=int, default=100)
    rollback = verb("rollback", help="new version with version N's edits")
    rollback.add_argument("--to", type=int, required=True)
    revert = verb("revert", help="new version without one edit")
    revert.add_argument("edit_id")
    protect = verb("protect", help="facts no edit may change: add, list, remove (admin)")
    protect.add_argument("action", choices=["add", "list", "remove"])
    protect.add_argument("--prompt", help="add: the full prompt")
    protect.add_argument("--answer", help="add: the expected continuation")
    protect.add_argument("--id", help="remove: the fact's id (from list)")
    verb("replicas", help="every live server: the version its replica serves")
    jobs = verb("jobs", help="recent jobs")
    jobs.add_argument("--kind", default="")
    jobs.add_argument("--limit", type=int, default=20)
    job = verb("job", help="one job")
    job.add_argument("job_id")
    client.set_defaults(func=cmd_client)


def add_tokens_parser(sub: Any) -> None:
    """``factpatch tokens add|revoke|list``: bearer tokens issued while the service runs."""
    tokens = sub.add_parser("tokens", help="issue, revoke and list bearer tokens (admin)")
    _connection_options(tokens, defaults=True, target=True)
    verbs = tokens.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="issue a token; printed once")
    add.add_argument("name", help="its name: the actor the ledger records")
    add.add_argument("--scope", action="append", required=True, choices=["infer", "edit", "admin"])
    revoke = verbs.add_parser("revoke", help="refused by every server within a second")
    revoke.add_argument("name")
    verbs.add_parser("list", help="issued tokens (names, scopes, who, when; never the tokens)")
    tokens.set_defaults(func=cmd_tokens)


def cmd_tokens(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.verb == "add":
        issued = client.add_token(args.name, args.scope)
        out = _dict(issued)
        text = f"token {issued.name} ({', '.join(issued.scopes)}): {issued.token}"
    elif args.verb == "revoke":
        issued = client.revoke_token(args.name)
        out, text = _dict(issued), f"revoked {issued.name}"
    else:
        listed = client.list_tokens()
        out = [_dict(t) for t in listed]
        text = "\n".join(f"{t.name}  {','.join(t.scopes)}  by {t.actor}" for t in listed)
    print(json.dumps(out, indent=1) if args.json else text)
    client.close()
    return 0
