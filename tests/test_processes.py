"""Real processes on one Redis: two servers and two workers, then the all-in-one ``factpatch up``.

Each process is ``python -m factpatch.cli …`` on a tiny model saved as a Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from factpatch.client import Client
from factpatch.ledger import Ledger
from factpatch.store import connect
from tests.test_service import PROMPT, TINY_HPARAMS

LISTENING = re.compile(r"(?:listening on|gRPC on) (\S+):(\d+)")


class Proc:
    """A child process whose output lines are collected by a thread (for the port, and logs)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "factpatch.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if m := pattern.search(line):
                return m
        raise AssertionError(f"no {pattern.pattern!r} within {timeout} s:\n{''.join(self.log)}")

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"did not stop on SIGTERM:\n{''.join(self.log)}") from None


@pytest.fixture
def model_folder(tiny_llama, tmp_path) -> str:
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {
        **os.environ,
        "FACTPATCH_CACHE_DIR": str(tmp_path / "cache"),
        "FACTPATCH_DEVICE": "cpu",
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",  # four processes on two cores
    }


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.popen.poll() is None:
            p.popen.kill()


def test_two_servers_two_workers_agree_bit_for_bit(model_folder, env, procs, redis_url):
    name = f"multi-{uuid.uuid4().hex[:8]}"
    common = ["--model", model_folder, "--redis-url", redis_url, "--ledger", name]
    common += ["--poll-interval", "0.2"]
    servers = [Proc(["server", *common, "--port", "0"], env) for _ in range(2)]
    hp = ["--hparams", json.dumps(TINY_HPARAMS), "--heartbeat-ttl", "5"]
    workers = [Proc(["worker", *common, *hp], env) for _ in range(2)]
    procs += servers + workers
    targets = [f"127.0.0.1:{s.wait_for(LISTENING, 120).group(2)}" for s in servers]
    clients = [Client(t, timeout=120) for t in targets]
    for c in clients:
        c.wait_ready(60)

    subjects = ["The Eiffel Tower", "Big Ben", "The Louvre", "Times Square", "The Colosseum"]
    jobs = [clients[i % 2].edit(PROMPT, s, "Rome") for i, s in enumerate(subjects)]
    done = [j.wait(timeout=300) for j in jobs]
    versions = sorted(j.version for j in done)
    assert versions == [1, 2, 3, 4, 5]  # one version per job, none twice

    ledger = Ledger(connect(redis_url), name)
    head = ledger.get(ledger.head())
    assert head.number == 5 and len(head.edits) == 5
    deadline = time.monotonic() + 30
    served = [c.served() for c in clients]
    while any(s.version != 5 for s in served) and time.monotonic() < deadline:
        time.sleep(0.2)
        served = [c.served() for c in clients]
    for s in served:
        assert s.version == 5 and s.ready
        assert dict(s.live_hashes) == head.hashes  # both replicas bit-identical to the ledger
    for c in clients:
        c.close()
    for p in procs:
        assert p.stop() == 0, "".join(p.log)


def test_up_serves_edits_and_stops_cleanly(model_folder, env, procs, tmp_path):
    hp = json.dumps(TINY_HPARAMS)
    args = ["up", "--model", model_folder, "--data-dir", str(tmp_path / "data"), "--port", "0"]
    up = Proc([*args, "--hparams", hp, "--poll-interval", "0.2"], env)
    procs.append(up)
    port = up.wait_for(LISTENING, 120).group(2)
    with Client(f"127.0.0.1:{port}", timeout=120) as fp:
        fp.wait_ready(60)
        job = fp.edit(PROMPT, "The Eiffel Tower", "Rome").wait(timeout=300)
        assert job.version == 1
    assert up.stop() == 0, "".join(up.log)
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any(
        (tmp_path / "data" / "redis").glob("appendonlydir/*")
    )

    # Restarted on the same data dir: the ledger is still there (the embedded Redis persists).
    up = Proc([*args, "--hparams", hp], env)
    procs.append(up)
    port = up.wait_for(LISTENING, 120).group(2)
    with Client(f"127.0.0.1:{port}", timeout=60) as fp:
        fp.wait_ready(60)
        assert fp.head().number == 1 and fp.served().version == 1
    assert up.stop() == 0, "".join(up.log)
