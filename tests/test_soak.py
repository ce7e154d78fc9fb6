"""The soak's two-minute version on the tiny model (bench/soak.py): separate processes, a
real redis-server with its append-only file, a seeded chaos loop, then the audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_service import TINY_HPARAMS

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
