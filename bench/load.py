"""Mixed load for a fixed time, then an audit: nothing acknowledged lost, replicas identical.

N client threads send generate (70%), score (20%) and edit (10%) requests round-robin to two
gRPC servers for ``--seconds``; one worker computes the edits.  Reported: requests per second,
p50/p99 latency per kind, errors by status code.  Then every acknowledged edit job is waited for
and checked against the ledger (its version exists and contains its edits), and both servers
must serve the head with live tensor hashes equal to the ledger's.

    python bench/load.py --out bench/results/load.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict

import grpc
import torch
from timing import ms

from factpatch.client import Client
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.models import load_model
from factpatch.models.options import model_args
from factpatch.queue import JobQueue, JobState
from factpatch.server import build_server
from factpatch.store import EmbeddedRedis
from factpatch.worker import Worker

SUBJECTS = ["The Eiffel Tower", "Big Ben", "The Colosseum", "The Louvre", "Times Square"]
CITIES = ["Rome", "Paris", "Tokyo", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna"]


def client_loop(target: str, seed: int, stop: threading.Event, out: dict) -> None:
    rng = random.Random(seed)
    fp = Client(target, timeout=600)
    while not stop.is_set():
        kind = rng.choices(["generate", "score", "edit"], [7, 2, 1])[0]
        subject = rng.choice(SUBJECTS)
        t = time.perf_counter()
        try:
            if kind == "generate":
                fp.generate(f"{subject} is located in the city of", max_new_tokens=8)
            elif kind == "score":
                fp.score(f"{subject} is located in the city of", " Paris")
            else:
                job = fp.edit("{} is located in the city of", subject, rng.choice(CITIES))
                out["acknowledged"].append(job.id)
            out["latency"][kind].append(time.perf_counter() - t)
        except grpc.RpcError as err:
            out["errors"][err.code().name] += 1
    fp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)  # --model, --device, --dtype
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--hparams", default="{}", help="JSON overrides for the worker")
    parser.add_argument("--out")
    args = parser.parse_args()

    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    copies = [handle.clone() for _ in range(2)]
    out = {"latency": defaultdict(list), "errors": Counter(), "acknowledged": []}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, EmbeddedRedis(tmp) as redis_server:
        client = redis_server.client()
        ledger, queue = Ledger(client, "load"), JobQueue(client, "load")
        servers = [
            build_server(
                h, ledger, queue, Settings(ledger="load", port=0, poll_interval=0.2)
            ).start()
            for h in (handle, copies[0])
        ]
        worker = Worker(
            copies[1], ledger, queue, poll_interval=0.2, hparams=json.loads(args.hparams)
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        targets = [f"127.0.0.1:{s.port}" for s in servers]
        for t in targets:
            Client(t).wait_ready()
        stop = threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(targets[i % 2], i, stop, out))
            for i in range(args.clients)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started

        # Audit: every acknowledged edit reaches a terminal state and is in the ledger.
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            jobs = [queue.get(j) for j in out["acknowledged"]]
            if all(j.state.terminal for j in jobs):
                break
            time.sleep(1)
        states = Counter(j.state.value for j in jobs)
        lost = [
            j.id
            for j in jobs
            if j.state != JobState.SUCCEEDED
            or not set(j.result["edit_ids"]) <= set(ledger.get(j.result["version"]).edits)
        ]
        head = ledger.get(ledger.head())
        for s in servers:
            s.frontend.replica.catch_up()
        served = [Client(t).served() for t in targets]
        identical = all(
            s.version == head.number and dict(s.live_hashes) == head.hashes for s in served
        )
        worker.stop()
        for s in servers:
            s.stop(grace=1)
        thread.join(timeout=60)

    lat = out["latency"]
    result = {
        "model": handle.name,
        "machine": platform.processor() or platform.machine(),
        "device": str(handle.device),
        "dtype": str(handle.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests_per_s": {k: round(len(v) / elapsed, 2) for k, v in lat.items()},
        "latency_ms": {
            k: {"p50": ms(v, 50), "p99": ms(v, 99), "n": len(v)} for k, v in lat.items()
        },
        "errors": dict(out["errors"]),
        "edits_acknowledged": len(out["acknowledged"]),
        "edit_job_states": dict(states),
        "acknowledged_but_not_in_ledger": lost,
        "head": head.number,
        "replicas_identical_to_ledger": identical,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
