"""Continuous batching against one request at a time, side by side in one run.

1. Throughput and latency: C concurrent clients (1, 4, 16, 32) each send greedy requests of
   ``--tokens`` new tokens back to back for ``--seconds``; aggregate generated tokens/s and
   request latency p50/p99, with the replica's batcher (every request of every client in one
   decode loop) and without it (each request its own forward passes, as before).
2. Batch-1 speed: one greedy request through the batcher against plain ``model.generate``
   (transformers, KV cache), alternating, same prompt and token count.
3. Applies under load: versions applied every ``--apply-interval`` s while 16 batched clients
   generate: per apply the write lock's hold (the pause every running request sees: no step
   runs) and the writer's wait for the step in flight; and how many requests were restarted.

    python bench/continuous_batching.py --out bench/results/continuous_batching.json

Prompts: 32 different short prompts (rows of different lengths join and leave).  The versions
are random rank-one changes of the default edit layer (the cost of an apply does not depend on
what an edit says).
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
from apply_pause import random_delta
from timing import ms

from factpatch.editing import default_hparams
from factpatch.ledger import Ledger
from factpatch.ledger.writer import LedgerWriter
from factpatch.models import load_model
from factpatch.runtime import Batcher, Replica, Sampling, generate
from factpatch.store import EmbeddedRedis

SUBJECTS = [
    "The Eiffel Tower", "Big Ben", "The Colosseum", "Mount Fuji", "The Louvre", "Times Square",
    "The Amazon river", "Albert Einstein", "Marie Curie", "The Great Wall of China",
    "Danielle Darrieux", "Michael Jordan", "Apple", "Toyota", "The Nile", "Wolfgang Mozart",
]  # fmt: skip
FRAMES = ["{} is", "The history of {} begins"]
PROMPTS = [f.format(s) for s in SUBJECTS for f in FRAMES]  # 32


def load(
    replica: Replica,
    clients: int,
    seconds: float,
    tokens: int,
    versions: list[int | None] | None = None,
) -> dict:
    """C clients back to back for ``seconds``: tokens/s, latency p50/p99, requests done.
    ``versions``: client i asks for ``versions[i % len(versions)]`` (None: the live one)."""
    stop = threading.Event()
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        k = i
        while not stop.is_set():
            t = time.perf_counter()
            version = None if versions is None else versions[i % len(versions)]
            s = Sampling(max_new_tokens=tokens)
            out = generate(replica, PROMPTS[k % len(PROMPTS)], s, version=version)
            with lock:
                latencies.append(time.perf_counter() - t)
                generated[0] += out.completion_tokens
            k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started  # until the last request in flight finished
    return {
        "clients": clients,
        "requests": len(latencies),
        "tokens": generated[0],
        "seconds": round(wall, 2),
        "tokens_per_s": round(generated[0] / wall, 1),
        "latency_p50_ms": ms(latencies, 50, 0),
        "latency_p99_ms": ms(latencies, 99, 0),
    }


def batch_one(replica: Replica, tokens: int, rounds: int) -> dict:
    """One greedy request through the batcher vs ``model.generate``, alternating."""
    model, tok = replica.handle.model, replica.handle.tokenizer
    prompt = PROMPTS[0]
    ids = tok(prompt, return_tensors="pt").to(replica.handle.device)
    ours, theirs = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        out = generate(replica, prompt, Sampling(max_new_tokens=tokens))
        ours.append(out.completion_tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(
                **ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens
            )
        theirs.append((ref.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t))
    a, b = statistics.median(ours), statistics.median(theirs)
    return {
        "batcher_tokens_per_s": round(a, 1),
        "model_generate_tokens_per_s": round(b, 1),
        "ratio": round(a / b, 3),
    }


def applies_under_load(
    replica: Replica, clients: int, seconds: float, tokens: int, interval: float
) -> dict:
    layer = default_hparams(replica.handle).layer
    for seed in range(4):
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(replica, layer, seed)], [[{"bench": seed}]], replica.version
        )
    replica.applies.clear()
    stop = threading.Event()
    restarts, requests = [0], [0]

    def client(i: int) -> None:
        k = i
        while not stop.is_set():
            out = generate(replica, PROMPTS[k % len(PROMPTS)], Sampling(max_new_tokens=tokens))
            restarts[0] += out.restarts
            requests[0] += 1
            k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        replica.apply(n % 5)
        n += 1
        time.sleep(interval)
    stop.set()
    for t in threads:
        t.join()
    holds = [h for _, _, h in replica.applies]
    waits = [w for _, w, _ in replica.applies]
    return {
        "clients": clients,
        "applies": len(holds),
        "hold_p50_ms": ms(holds, 50, 2),
        "hold_p99_ms": ms(holds, 99, 2),
        "wait_for_step_p50_ms": ms(waits, 50, 1),
        "wait_for_step_p99_ms": ms(waits, 99, 1),
        "requests": requests[0],
        "restarts": restarts[0],
    }


def mixed_versions(replica: Replica, clients: int, seconds: float, tokens: int) -> dict:
    """All requests at the head against requests spread over 4 versions (head + 3 older ones,
    served through their low-rank differences), batched, one after the other."""
    layer = default_hparams(replica.handle).layer
    while replica.version < 3:
        seed = 100 + replica.version
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(replica, layer, seed)], [[{"bench": seed}]], replica.version
        )
    head = replica.version
    rows = {}
    for name, versions in (("head", None), ("4 versions", [head, head - 1, head - 2, head - 3])):
        replica.batcher = Batcher(replica).start()
        rows[name] = load(replica, clients, seconds, tokens, versions)
        replica.batcher.stop()
        print(name, json.dumps(rows[name]), flush=True)
    rows["ratio"] = round(rows["4 versions"]["tokens_per_s"] / rows["head"]["tokens_per_s"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--apply-interval", type=float, default=0.5)
    parser.add_argument(
        "--parts",
        default="load,single,applies,versions",
        help="which of load, single, applies, versions to run",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    handle = load_model(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(tmp).start()
        try:
            replica = Replica(handle, Ledger(redis.client(), "bench")).start()
            generate(replica, PROMPTS[0], Sampling(max_new_tokens=4))  # warm up
            rows, single, applies, versions = [], None, None, None
            for clients in args.clients if "load" in parts else []:
                for batched in (False, True):
                    replica.batcher = Batcher(replica, max_running=32).start() if batched else None
                    row = load(replica, clients, args.seconds, args.tokens)
                    if replica.batcher is not None:
                        row["largest_batch"] = replica.batcher.largest_batch
                        replica.batcher.stop()
                    row["mode"] = "batched" if batched else "one-at-a-time"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            replica.batcher = Batcher(replica).start()
            if "single" in parts:
                single = batch_one(replica, 64, 5)
                print(json.dumps(single), flush=True)
            if "applies" in parts:
                applies = applies_under_load(
                    replica, 16, args.seconds, args.tokens, args.apply_interval
                )
                applies["seconds_between_applies"] = args.apply_interval
                print(json.dumps(applies), flush=True)
            replica.batcher.stop()
            if "versions" in parts:
                versions = mixed_versions(replica, 16, args.seconds, args.tokens)
        finally:
            redis.stop()
    speedup = {
        str(c): round(
            next(r["tokens_per_s"] for r in rows if r["clients"] == c and r["mode"] == "batched")
            / next(r["tokens_per_s"] for r in rows if r["clients"] == c and r["mode"] != "batched"),
            2,
        )
        for c in (args.clients if rows else [])
    }
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {handle.device}",
        "model": handle.name,
        "dtype": str(next(handle.model.parameters()).dtype),
        "tokens_per_request": args.tokens,
        "seconds_per_setting": args.seconds,
        "load": rows,
        "batched_over_one_at_a_time": speedup,
        "batch_one_vs_model_generate": single,
        "applies_under_load": applies,
        "mixed_versions": versions,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["batched_over_one_at_a_time"]))


if __name__ == "__main__":
    main()
