"""The soak's two-minute version on the tiny model (bench/soak.py): separate processes, a
real redis-server with its append-only file, a seeded chaos loop, then the audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_service import PROMPT, TINY_HPARAMS, Stack, stack  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_a_two_minute_soak_with_faults_loses_nothing(model_folder, env, tmp_path):
    out = tmp_path / "soak.json"
    command = [
        *(sys.executable, "-m", "bench.soak", "--minutes", "2", "--model", model_folder),
        *("--chaos-every", "15", "30", "--seed", "5", "--clients", "3"),
        *("--hparams", json.dumps(TINY_HPARAMS), "--start-timeout", "120"),
        *("--audit-timeout", "120", "--out", str(out)),
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    roles = [f["role"] for f in result["faults"]]
    # Seed 5 kills a worker, Redis, the other worker, then a server.
    assert roles[:4] == ["worker0", "redis", "worker1", "server1"], roles
    assert result["problems"] == [] and result["replicas_agree"] == 2
    assert result["acknowledged_jobs"] >= 5 and result["states"].get("succeeded", 0) >= 5
    assert result["errors"]["outside_faults"]["calls"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("soak: 2 min,")


def test_the_audit_finds_a_duplicate_a_wrong_rollback_and_a_lagging_replica(stack: Stack):  # noqa: F811
    from bench.soak import Record, audit

    job = stack.client.edit(PROMPT, "Big Ben", "Rome").wait(timeout=120)
    stack.client.rollback(0)  # version 2: exact
    ledger = stack.ledger

    class Two:  # the audit's view of a stack: its ledger and two servers (here the same one)
        def ledger(self):
            return ledger, stack.queue

        def target(self, i: int) -> str:
            return stack.target

    clean = audit(Two(), Record(jobs=[job.id], rollbacks=[(0, 2)]), timeout=30)
    assert clean["problems"] == [] and clean["replicas_agree"] == 2

    # A second version that adds the job's edit again, which the replica refuses to serve
    # (its hashes are not those of the list), and a rollback that did not restore its target.
    ids = list(job.edit_ids)
    head = ledger.get(ledger.head())
    ledger.commit(head.number, ids, {"kind": "edit", "edits": ids}, head.hashes, "x")
    found = audit(Two(), Record(jobs=[job.id], rollbacks=[(1, 2)]), 30, serve_timeout=1)
    problems = "\n".join(found["problems"])
    assert f"edit {ids[0][:12]} added 2×" in problems
    assert "rollback to 1 (version 2) differs" in problems
    assert "server0 serves 2" in problems and found["replicas_agree"] == 0
