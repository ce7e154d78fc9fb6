"""Every setting of the service in one table: flag, environment variable, default, meaning.

12-factor: each flag can be given as ``FACTPATCH_<NAME>`` in the environment instead; a flag on
the command line wins.  docs/operations.md shows this table.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Option:
    name: str  # flag --name, env FACTPATCH_NAME (dashes → underscores, upper case)
    type: type
    default: Any
    help: str
    roles: tuple[str, ...] = ("server", "worker", "up")

    @property
    def env(self) -> str:
        return "FACTPATCH_" + self.name.replace("-", "_").upper()

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("model", str, "gemma-3-270m", "bundled alias, HF folder or .gguf file"),
    Option("device", str, None, "torch device (default: cuda when present, else cpu)"),
    Option("dtype", str, "auto", "float32, bfloat16, float16 or auto (float32 on CPU)"),
    Option("redis-url", str, None, "Redis URL; unset: embedded Redis in --data-dir"),
    Option("data-dir", str, None, "embedded Redis data and generated secrets (default: user data)"),
    Option("ledger", str, "default", "ledger and queue name (one per served model)"),
    Option("host", str, "127.0.0.1", "gRPC listen address", ("server", "up")),
    Option("port", int, 50051, "gRPC listen port (0: any free port)", ("server", "up")),
    Option(
        "http-port",
        int,
        8000,
        "OpenAI-compatible HTTP API port (0: any free port)",
        ("server", "up"),
    ),
    Option("no-http", bool, False, "do not serve the OpenAI-compatible HTTP API", ("server", "up")),
    Option(
        "no-console",
        bool,
        False,
        "do not serve the web console (/console) and its JSON API (/api/v1) on the HTTP port",
        ("server", "up"),
    ),
    Option("metrics-port", int, 9400, "Prometheus /metrics port (0: off)"),
    Option("poll-interval", float, 1.0, "seconds between ledger head checks"),
    Option("drain-seconds", float, 10.0, "on SIGTERM: seconds to finish running requests"),
    Option("max-prompt-chars", int, 2000, "longest prompt accepted", ("server", "up")),
    Option("max-new-tokens", int, 512, "largest max_new_tokens accepted", ("server", "up")),
    Option("max-edits-per-request", int, 16, "most FactEdits in one SubmitEdits", ("server", "up")),
    Option("max-batch", int, 8, "most texts (or prompts × n) in one request", ("server", "up")),
    Option(
        "max-running",
        int,
        32,
        "most sequences decoded together (continuous batching; 0: one request at a time)",
        ("server", "up"),
    ),
    Option("max-streams-per-client", int, 8, "open streams per caller", ("server", "up")),
    Option(
        "request-deadline",
        float,
        300.0,
        "longest a Generate/ModelInfer may run (s)",
        ("server", "up"),
    ),
    Option(
        "gate",
        float,
        None,
        "serve edits behind key gates of this threshold, e.g. 0.5 (unset: in the weights)",
        ("server", "up"),
    ),
    Option("tokens-file", str, None, "JSON list of {name, sha256, scopes}", ("server", "up")),
    Option(
        "insecure-no-auth",
        bool,
        False,
        "serve without tokens (local experiments only)",
        ("server", "up"),
    ),
    Option("tls-cert", str, None, "server certificate (PEM): TLS on", ("server", "up")),
    Option("tls-key", str, None, "server private key (PEM)", ("server", "up")),
    Option(
        "tls-client-ca", str, None, "CA (PEM) for client certificates: mutual TLS", ("server", "up")
    ),
    Option(
        "checks",
        str,
        "edit=enforce,earlier=warn,protected=warn,fluency=warn",
        "checked commits: policy per check (enforce, warn, off), or one for all; a request "
        "may override it (docs/checks.md)",
        ("server", "up"),
    ),
    Option("max-attempts", int, 3, "tries of a job before it is dead-lettered"),
    Option(
        "rebase-limit",
        int,
        8,
        "edit versions a delta may be rebased over (0: recompute)",
        ("worker", "up"),
    ),
    Option("heartbeat-ttl", float, 15.0, "seconds without a heartbeat before a worker is dead"),
    Option(
        "worker-name",
        str,
        None,
        "queue consumer name (default: unique per process)",
        ("worker", "up"),
    ),
    Option(
        "hparams",
        str,
        None,
        'JSON overrides of the edit defaults, e.g. {"layer": 3, "memit": {"layers": [2]}}',
        ("worker", "up"),
    ),
)


@dataclass(frozen=True)
class Settings:
    model: str = "gemma-3-270m"
    device: str | None = None
    dtype: str = "auto"
    redis_url: str | None = None
    data_dir: str | None = None
    ledger: str = "default"
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000
    no_http: bool = False
    no_console: bool = False
    metrics_port: int = 9400
    poll_interval: float = 1.0
    drain_seconds: float = 10.0
    max_prompt_chars: int = 2000
    max_new_tokens: int = 512
    max_edits_per_request: int = 16
    max_batch: int = 8
    max_running: int = 32
    max_streams_per_client: int = 8
    request_deadline: float = 300.0
    gate: float | None = None
    tokens_file: str | None = None
    insecure_no_auth: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    checks: str = "edit=enforce,earlier=warn,protected=warn,fluency=warn"
    max_attempts: int = 3
    rebase_limit: int = 8
    heartbeat_ttl: float = 15.0
    worker_name: str | None = None
    hparams: str | None = None  # JSON object
    tour: bool = False  # up only: run the worked example against itself once ready

    def hparam_overrides(self) -> dict[str, Any]:
        if not self.hparams:
            return {}
        try:
            value = json.loads(self.hparams)
        except json.JSONDecodeError as err:
            raise ValueError(f"hparams: not JSON ({err})") from err
        if not isinstance(value, dict):
            raise ValueError("hparams: must be a JSON object")
        return value

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in known and v is not None})


def add_options(parser: argparse.ArgumentParser, role: str) -> None:
    """Add the flags of ``role``; defaults come from the environment, then the table."""
    for opt in OPTIONS:
        if role not in opt.roles:
            continue
        raw = os.environ.get(opt.env)
        if opt.type is bool:
            on = raw is not None and raw.lower() in ("1", "true", "yes", "on")
            parser.add_argument(
                f"--{opt.name}", action="store_true", default=on, help=f"{opt.help} [{opt.env}]"
            )
            continue
        default = opt.type(raw) if raw is not None else opt.default
        parser.add_argument(
            f"--{opt.name}", type=opt.type, default=default, help=f"{opt.help} [{opt.env}]"
        )


def markdown_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = "" if o.default is None else f"`{o.default}`"
        rows.append(f"| `--{o.name}` | `{o.env}` | {default} | {o.help} |")
    return "\n".join(rows)
