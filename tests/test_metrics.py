"""Scrape a running server and worker (real processes) and check every factpatch metric's name,
type, unit and labels with prometheus_client's parser — and with promtool where installed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from factpatch.client import Client
from tests.procs import LISTENING, Proc
from tests.test_service import PROMPT, TINY_HPARAMS

ALLOWED_LABELS = {
    *("method", "route", "code", "api", "protocol", "kind", "outcome", "phase", "version"),
    *("model", "role", "check", "result"),
}
SERVER_METRICS = {
    "factpatch_rpc_requests": "counter",
    "factpatch_rpc_duration_seconds": "histogram",
    "factpatch_inference_duration_seconds": "histogram",
    "factpatch_time_to_first_token_seconds": "histogram",
    "factpatch_generated_tokens": "counter",
    "factpatch_queue_depth": "gauge",
    "factpatch_queue_oldest_job_age_seconds": "gauge",
    "factpatch_apply_pause_seconds": "histogram",
    "factpatch_apply_wait_seconds": "histogram",
    "factpatch_model_version": "gauge",
    "factpatch_ledger_head": "gauge",
    "factpatch_version_lag": "gauge",
    "factpatch_replica_ready": "gauge",
    "factpatch_rollbacks": "counter",
    "factpatch_hash_verification_failures": "counter",
    "factpatch_model_load_seconds": "gauge",
    "factpatch_build_info": "gauge",
}
WORKER_METRICS = {
    "factpatch_job_duration_seconds": "histogram",
    "factpatch_edit_phase_seconds": "histogram",
    "factpatch_job_retries": "counter",
    "factpatch_dead_letters": "counter",
    "factpatch_checks": "counter",
    "factpatch_check_seconds": "histogram",
    "factpatch_commits_refused": "counter",
    "factpatch_model_version": "gauge",
    "factpatch_build_info": "gauge",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def check(text: str, expected: dict[str, str]) -> dict:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in expected.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, (name, families[name].type)
    for name, family in families.items():
        if not name.startswith("factpatch_"):
            continue  # the client library's process_/python_ metrics
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        if family.type == "histogram" or "duration" in name or "latency" in name:
            assert name.endswith("_seconds"), f"{name}: time in base units"
        for sample in family.samples:
            extra = set(sample.labels) - ALLOWED_LABELS - {"le"}
            assert not extra, (name, extra)  # no job ids, edit ids or prompts
    return families


def promtool(text: str) -> None:
    if shutil.which("promtool") is None:
        return
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout + out.stderr
    )


def test_server_and_worker_metrics(model_folder, env, procs, redis_url):
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    common = ["--model", model_folder, "--redis-url", redis_url, "--ledger", name]
    server_metrics, worker_metrics = free_port(), free_port()
    flags = [
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        str(server_metrics),
        "--insecure-no-auth",
    ]
    server = Proc(["server", *common, *flags], env)
    hp = ["--hparams", json.dumps(TINY_HPARAMS)]
    worker = Proc(["worker", *common, *hp, "--metrics-port", str(worker_metrics)], env)
    procs += [server, worker]
    port = server.wait_for(LISTENING, 120).group(2)
    with Client(f"127.0.0.1:{port}", timeout=120) as fp:
        fp.wait_ready(60)
        fp.edit(PROMPT, "The Eiffel Tower", "Rome").wait(timeout=300)
        fp.generate("The Eiffel Tower is in", max_new_tokens=3)
        fp.score("The Eiffel Tower is in", " Rome")
        fp.rollback(0)
        with pytest.raises(grpc.RpcError):
            fp.version(99)  # a NOT_FOUND to count

    text = scrape(server_metrics)
    families = check(text, SERVER_METRICS)
    codes = {
        (s.labels["method"], s.labels["code"])
        for s in families["factpatch_rpc_requests"].samples
        if s.name.endswith("_total")
    }
    assert ("SubmitEdits", "OK") in codes and ("GetVersion", "NOT_FOUND") in codes
    roles = {s.labels["role"] for s in families["factpatch_build_info"].samples}
    assert roles == {"server"}
    assert any(s.value >= 1 for s in families["factpatch_rollbacks"].samples)
    promtool(text)

    text = scrape(worker_metrics)
    families = check(text, WORKER_METRICS)
    phases = {s.labels["phase"] for s in families["factpatch_edit_phase_seconds"].samples}
    assert {"keys", "optimise", "solve", "commit"} <= phases
    outcomes = {
        s.labels["outcome"]
        for s in families["factpatch_job_duration_seconds"].samples
        if s.name.endswith("_count") and s.value > 0
    }
    assert outcomes == {"succeeded"}
    checks = {
        s.labels["check"] for s in families["factpatch_checks"].samples if s.name.endswith("_total")
    }
    assert checks == {"edit", "earlier", "protected", "fluency"}  # each ran once on the edit
    promtool(text)
    for p in procs:
        assert p.stop() == 0, "".join(p.log)
