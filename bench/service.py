"""The full path under load: edits per minute (1 worker, then 2), queue latency, and inference
latency while edits are computed and applied vs. idle.

One process: embedded Redis, one gRPC server, N workers (threads, each with its own model copy),
a client thread scoring continuously over gRPC.  Everything shares this machine's cores, so the
figures are for one box; with workers on their own machines (or GPUs) edits/minute scales with
the worker count while serving latency does not pay for the edit computation.

    python bench/service.py --out bench/results/service.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time

import torch
from timing import ms

from factpatch.client import Client, JobHandle
from factpatch.config import Settings
from factpatch.ledger import Ledger
from factpatch.models import load_model
from factpatch.models.options import model_args
from factpatch.queue import JobQueue
from factpatch.rpc import pb
from factpatch.server import build_server
from factpatch.store import EmbeddedRedis
from factpatch.worker import Worker

SUBJECTS = [
    "The Eiffel Tower",
    "Big Ben",
    "The Colosseum",
    "The Louvre",
    "Times Square",
    "The Brandenburg Gate",
    "The Golden Gate Bridge",
    "The Sydney Opera House",
]
TARGETS = ["Rome", "Paris", "Tokyo", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna"]


class Prober:
    """Scores one prompt over gRPC in a loop; records (start time, latency, version)."""

    def __init__(self, target: str) -> None:
        self.client = Client(target, timeout=120)
        self.samples: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            s = self.client.score("The capital of France is", " Paris")
            self.samples.append((t, time.perf_counter() - t, s.version))

    def window(self, t0: float, t1: float) -> list[float]:
        return [lat for t, lat, _ in self.samples if t0 <= t < t1]


def run_edits(fp: Client, n: int, offset: int) -> dict:
    running_at: dict[str, float] = {}
    t0 = time.perf_counter()
    handles = [
        fp.edit("{} is located in the city of", SUBJECTS[(offset + i) % 8], TARGETS[i % 8])
        for i in range(n)
    ]
    created = {h.id: time.time() for h in handles}

    def follow(h: JobHandle) -> None:
        def seen(job: pb.Job) -> None:
            if job.state == pb.RUNNING and job.id not in running_at:
                running_at[job.id] = time.time()

        h.wait(timeout=1800, on_update=seen)

    threads = [threading.Thread(target=follow, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    waits = [running_at[i] - created[i] for i in running_at]
    return {
        "edits": n,
        "seconds": round(elapsed, 1),
        "edits_per_minute": round(60 * n / elapsed, 2),
        "queue_wait_s": {
            "p50": round(statistics.median(waits), 2),
            "max": round(max(waits), 2),
        },
        "t0": t0,
        "t1": t0 + elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(parser)  # --model, --device, --dtype
    parser.add_argument("--edits", type=int, default=6)
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()

    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    # Workers' models are copied now, before the server's replica applies any edit.
    copies = [handle.clone() for _ in range(2)]
    results: dict = {
        "model": handle.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "device": str(handle.device),
        "dtype": str(handle.dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, EmbeddedRedis(tmp) as redis_server:
        client = redis_server.client()
        ledger, queue = Ledger(client, "bench"), JobQueue(client, "bench")
        server = build_server(handle, ledger, queue, Settings(ledger="bench", port=0))
        server.start()
        target = f"127.0.0.1:{server.port}"
        fp = Client(target, timeout=600)
        fp.wait_ready()
        prober = Prober(target)
        prober.thread.start()
        time.sleep(args.idle_seconds)
        idle = prober.window(0, time.perf_counter())
        workers, threads = [], []
        for n_workers in (1, 2):
            while len(workers) < n_workers:
                w = Worker(copies.pop(), ledger, queue, poll_interval=0.5)
                workers.append(w)
                threads.append(threading.Thread(target=w.run, daemon=True))
                threads[-1].start()
            time.sleep(3)  # the new worker catches up
            run = run_edits(fp, args.edits, offset=len(workers) * args.edits)
            during = prober.window(run.pop("t0"), run.pop("t1"))
            run["inference_ms_during_edits"] = {"p50": ms(during, 50), "p99": ms(during, 99)}
            results[f"workers_{n_workers}"] = run
        prober.stop.set()
        prober.thread.join()
        results["inference_ms_idle"] = {"p50": ms(idle, 50), "p99": ms(idle, 99), "n": len(idle)}
        results["score_requests"] = len(prober.samples)
        results["head"] = fp.head().number
        for w in workers:
            w.stop()
        server.stop(grace=1)
        for t in threads:
            t.join(timeout=60)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
