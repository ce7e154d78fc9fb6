"""A soak with faults: the whole service as separate processes under mixed load while a seeded
chaos loop SIGKILLs and restarts its parts, then an audit of everything acknowledged.

    python -m bench.soak --minutes 30 --out bench/results/soak.json          # the benchmark
    python -m bench.soak --minutes 2 --model FOLDER --chaos-every 15 30      # tests/test_soak.py

Processes on loopback: one ``redis-server`` (append-only file, fsync always; started here, on a
unix socket), two ``factpatch server`` and two ``factpatch worker``.  Client threads send
generate, score, single edits, MEMIT batches of two, rollbacks and reverts to either server.
Every ``--chaos-every`` seconds (uniform between the two bounds, seeded) the chaos loop SIGKILLs
one of the five processes and starts it again; each fault's window runs from the kill until the
process is back (a server listening, a worker ready, Redis answering).

The audit, once the load and the chaos have stopped and every process is up:

* every acknowledged edit job is in a final state: SUCCEEDED and committed exactly once (its
  version's edits are the job's, no other version adds them, its commit key names that version)
  or FAILED on purpose with its reason (a checked commit or the engine's guard refused it;
  never retried, nothing written) — never DEAD, never still queued or running;
* every acknowledged rollback's version has its target's edit list and tensor hashes;
* both servers serve the head with live tensor hashes equal to the ledger's;
* client errors inside and outside the fault windows.

One summary line; exit status 1 on any loss (a job not final or not committed, a duplicate, a
rollback or a replica that differs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from factpatch.client import Client, JobFailed
from factpatch.ledger import Ledger
from factpatch.queue import JobQueue, JobState
from factpatch.rpc import pb
from factpatch.store import EmbeddedRedis

SUBJECTS = ["The Eiffel Tower", "Big Ben", "The Colosseum", "The Louvre", "Times Square"]
CITIES = ["Rome", "Paris", "Tokyo", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna"]
PROMPT = "{} is located in the city of"
ROLES = ("server0", "server1", "worker0", "worker1", "redis")
#: What a client thread sends, and how often (weights).
OPS = {"generate": 50, "score": 20, "edit": 16, "memit": 6, "rollback": 4, "revert": 4}
FINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD}
READY = {"server": re.compile(r"gRPC on \S+:\d+|listening on"), "worker": re.compile(r"ready at")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """One ``factpatch`` process, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        with log.open("a") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "factpatch.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log.open() as f:
                f.seek(self.offset)
                if pattern.search(f.read()):
                    return
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.log.name}: not ready after {timeout} s (see {self.log})")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


class Stack:
    """Redis, two servers and two workers; any of them killed and started again on demand."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.folder, self.args = folder, args
        self.redis = EmbeddedRedis(folder / "redis").start()
        self.name = "soak"
        self.ports = [free_port(), free_port()]
        self.children: dict[str, Child] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for role in ROLES[:4]:
            self.start(role)

    def common(self) -> list[str]:
        return [
            *("--model", self.args.model, "--redis-url", self.redis.url, "--ledger", self.name),
            *("--poll-interval", "0.2", "--metrics-port", "0"),
        ]

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def start(self, role: str) -> None:
        if role == "redis":
            self.redis = EmbeddedRedis(self.folder / "redis").start()  # from its AOF
            return
        kind, i = role[:-1], int(role[-1])
        if kind == "server":
            flags = ["--port", str(self.ports[i]), "--http-port", "0", "--insecure-no-auth"]
        else:
            flags = ["--heartbeat-ttl", "3", "--worker-name", f"{role}-{time.time_ns()}"]
            if self.args.hparams:
                flags += ["--hparams", self.args.hparams]
        child = Child([kind, *self.common(), *flags], self.folder / f"{role}.log", self.env)
        child.wait_for(READY[kind], self.args.start_timeout)
        self.children[role] = child

    def kill(self, role: str) -> None:
        if role == "redis":
            self.redis.stop(kill=True)
        else:
            self.children[role].kill()

    def stop(self) -> None:
        for child in self.children.values():
            if child.popen.poll() is None:
                child.popen.terminate()
                try:
                    child.popen.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        self.redis.stop()

    def ledger(self) -> tuple[Ledger, JobQueue]:
        client = self.redis.client()
        return Ledger(client, self.name), JobQueue(client, self.name)


class Refused(Exception):
    """An edit job FAILED on purpose: a checked commit or the engine's guard refused it."""


@dataclass
class Record:
    """What the clients saw: every call (time, kind, status) and every acknowledgement."""

    calls: list[tuple[float, str, str]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # acknowledged edit jobs
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (to, the new version)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(stack: Stack, seed: int, stop: threading.Event, rec: Record) -> None:
    rng = random.Random(seed)
    clients: dict[str, Client] = {}
    while not stop.is_set():
        kind = rng.choices(list(OPS), list(OPS.values()))[0]
        target = stack.target(rng.randrange(2))
        fp = clients.setdefault(target, Client(target, timeout=60))
        subject = rng.choice(SUBJECTS)
        status = "OK"
        try:
            _one(fp, kind, subject, rng, rec)
        except grpc.RpcError as err:
            status = err.code().name
        except Refused:
            status = "REFUSED"  # an answer, not an error
        except (TimeoutError, ValueError) as err:  # a job watched past its deadline
            status = type(err).__name__
        with rec.lock:
            rec.calls.append((time.time(), kind, status))
        if status != "OK":
            time.sleep(0.2)  # a server or Redis is away: don't spin
    for fp in clients.values():
        fp.close()


def _one(fp: Client, kind: str, subject: str, rng: random.Random, rec: Record) -> None:
    if kind == "generate":
        fp.generate(f"{subject} is located in the city of", max_new_tokens=8)
    elif kind == "score":
        fp.score(f"{subject} is located in the city of", " Paris")
    elif kind in ("edit", "memit"):
        facts = [dict(prompt=PROMPT, subject=subject, target=rng.choice(CITIES))]
        if kind == "memit":
            other = rng.choice([s for s in SUBJECTS if s != subject])
            facts.append(dict(prompt=PROMPT, subject=other, target=rng.choice(CITIES)))
        key = f"soak-{rng.getrandbits(64):016x}"  # a retried call never makes a second job
        job = fp.submit_edits(facts, key, method="rome" if kind == "edit" else "memit")
        with rec.lock:
            rec.jobs.append(job.id)  # acknowledged: the audit will look for it
        try:  # wait for it, as a person correcting a fact would (and the queue stays short)
            job.wait(timeout=600)
        except JobFailed as failed:
            if failed.job.state != pb.FAILED:  # DEAD or CANCELLED: the service let it down
                raise ValueError(failed.job.error) from failed
            raise Refused(failed.job.error) from failed  # a checked commit or the guard said no
    elif kind == "rollback":
        head = fp.head().number
        to = rng.randrange(max(0, head - 5), head + 1)
        change = fp.rollback(to)
        with rec.lock:
            rec.rollbacks.append((to, change.version.number))
    else:  # revert one active edit
        edits = list(fp.head().edit_ids)
        if edits:
            fp.revert(rng.choice(edits))


def chaos_loop(
    stack: Stack, rng: random.Random, every: tuple[float, float], stop: threading.Event, log: list
) -> None:
    while not stop.wait(rng.uniform(*every)):
        role = rng.choice(ROLES)
        killed = time.time()
        stack.kill(role)
        try:
            stack.start(role)
        except RuntimeError as err:  # could not come back: the audit reports it
            log.append({"role": role, "killed": killed, "back": time.time(), "error": str(err)})
            return
        log.append({"role": role, "killed": killed, "back": time.time()})
        print(f"chaos: {role} killed and back in {time.time() - killed:.1f} s", flush=True)


def refusal(error: str | None) -> str:
    """Who refused a FAILED edit job: the engine's update-size guard or a checked commit."""
    text = error or ""
    if text.startswith("DegenerateEditError"):
        return "guard"
    if text.startswith("checks refused"):
        return "checks"
    return text[:60] or "unknown"


def audit(stack: Any, rec: Record, timeout: float, serve_timeout: float = 60.0) -> dict[str, Any]:
    """Read back everything the clients were told (``stack``: anything with ``ledger()`` and
    ``target(i)`` for the two servers); ``problems`` lists each loss."""
    ledger, queue = stack.ledger()
    deadline = time.monotonic() + timeout
    jobs = {}
    for job_id in rec.jobs:  # wait for every acknowledged job to end
        while True:
            job = queue.get(job_id)
            if job.state in FINAL or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        jobs[job_id] = job
    versions = ledger.versions()
    added_by = Counter(e for v in versions if v.cause["kind"] == "edit" for e in v.cause["edits"])
    problems: list[str] = []
    for job in jobs.values():
        if job.state == JobState.FAILED:
            continue  # refused, with the reason, never retried: an outcome, not a loss
        if job.state != JobState.SUCCEEDED:
            problems.append(f"job {job.id}: {job.state.value} ({job.error})")
            continue
        number, ids = job.result["version"], job.result["edit_ids"]
        if versions[number].cause.get("edits") != ids or ledger.committed(job.commit_key) != number:
            problems.append(f"job {job.id}: version {number} is not its commit")
        problems += [
            f"job {job.id}: edit {e[:12]} added {added_by[e]}×" for e in ids if added_by[e] != 1
        ]
    for to, number in rec.rollbacks:
        want, got = versions[to], versions[number]
        if got.edits != want.edits or any(got.hashes.get(m) != h for m, h in want.hashes.items()):
            problems.append(f"rollback to {to} (version {number}) differs from {to}")
    head = ledger.get(ledger.head())
    agree = 0
    for i in range(2):
        with Client(stack.target(i), timeout=30) as fp:
            until = time.monotonic() + serve_timeout
            while fp.served().version != head.number and time.monotonic() < until:
                time.sleep(0.5)
            served = fp.served()
        if served.version == head.number and dict(served.live_hashes) == head.hashes:
            agree += 1
        else:
            problems.append(f"server{i} serves {served.version}, hashes differ from the head")
    return {
        "acknowledged_jobs": len(jobs),
        "states": dict(Counter(j.state.value for j in jobs.values())),
        "refused_by": dict(
            Counter(refusal(j.error) for j in jobs.values() if j.state == JobState.FAILED)
        ),
        "versions": len(versions),
        "rollbacks": len(rec.rollbacks),
        "replicas_agree": agree,
        "problems": problems,
    }


def error_rates(rec: Record, faults: list[dict[str, Any]], grace: float = 5.0) -> dict[str, Any]:
    """Share of failed client calls inside the fault windows (kill → back + ``grace`` s, for
    clients to reconnect) and outside them."""

    def inside(t: float) -> bool:
        return any(f["killed"] <= t <= f["back"] + grace for f in faults)

    out: dict[str, Any] = {}
    for name, pick in (("during_faults", True), ("outside_faults", False)):
        calls = [c for c in rec.calls if inside(c[0]) == pick]
        failed = [c for c in calls if c[2] not in ("OK", "REFUSED")]
        out[name] = {
            "calls": len(calls),
            "errors": len(failed),
            "rate": round(len(failed) / len(calls), 4) if calls else None,
            "by_status": dict(Counter(c[2] for c in failed)),
            "refused_edits": sum(c[2] == "REFUSED" for c in calls),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--chaos-every", type=float, nargs=2, default=(120.0, 300.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", help="JSON overrides for the workers (tests: tiny settings)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--audit-timeout", type=float, default=900.0)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.time()
    stack = Stack(args, folder)
    rec, faults, stop, halt = Record(), [], threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(stack, args.seed * 100 + i, stop, rec))
        for i in range(args.clients)
    ]
    chaos = threading.Thread(
        target=chaos_loop,
        args=(stack, random.Random(args.seed), tuple(args.chaos_every), halt, faults),
    )
    for t in [*threads, chaos]:
        t.start()
    try:
        time.sleep(args.minutes * 60)
    finally:
        halt.set()
        chaos.join()  # a restart in progress completes: every process is up for the audit
        stop.set()
        for t in threads:
            t.join()
    load_seconds = time.time() - started
    try:
        result = audit(stack, rec, args.audit_timeout)
    finally:
        stack.stop()
    result["problems"] += [
        f"{f['role']} did not come back: {f['error']}" for f in faults if "error" in f
    ]
    result.update(
        {
            "minutes": args.minutes,
            "seed": args.seed,
            "model": args.model,
            "calls": len(rec.calls),
            "calls_per_second": round(len(rec.calls) / load_seconds, 2),
            "faults": faults,
            "errors": error_rates(rec, faults),
            "logs": str(folder),
            "date": time.strftime("%Y-%m-%d"),
            "command": "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        }
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    errors = result["errors"]
    print(
        f"soak: {args.minutes:g} min, {len(rec.calls)} calls, {len(faults)} faults "
        f"({', '.join(f['role'] for f in faults) or 'none'}), {result['acknowledged_jobs']} edit "
        f"jobs acknowledged {result['states']}, {result['rollbacks']} rollbacks, replicas agree "
        f"{result['replicas_agree']}/2, errors {errors['during_faults']['rate']} during faults / "
        f"{errors['outside_faults']['rate']} outside, problems {len(result['problems'])}"
    )
    for problem in result["problems"]:
        print("  LOSS:", problem)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
