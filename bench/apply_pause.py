"""How long applying a version blocks inference, and generation speed vs. plain transformers.

Both measured in one run on the same model and settings:

1. Apply pause: versions are committed to a ledger (embedded Redis), then applied in a loop
   while generating threads keep the model busy.  For each apply we record the critical section
   (the write lock held: no forward pass can run) and the writer's wait for the forward steps
   already running (new steps queue behind the writer meanwhile, so a new step is held back at
   most wait + critical section).
2. Throughput: greedy decoding of the same prompt and token count with factpatch's
   ``runtime.generate`` and with ``model.generate`` (transformers), alternating, tokens/s each.

    python bench/apply_pause.py --out bench/results/apply_pause.json

The deltas are random rank-one changes of the default edit layer's MLP output weight: the cost
of an apply depends on the tensors touched, not on what the edit says.
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

from factpatch.editing import Delta, default_hparams
from factpatch.ledger import Ledger
from factpatch.ledger.writer import LedgerWriter
from factpatch.models import load_model
from factpatch.runtime import Replica, Sampling, generate
from factpatch.store import EmbeddedRedis

PROMPT = "The history of the city of Paris begins"


def random_delta(replica: Replica, layer: int, seed: int) -> Delta:
    g = torch.Generator().manual_seed(seed)
    w = replica.handle.rewrite_weight(layer)
    left = torch.randn(w.shape[0], 1, generator=g) * 1e-3
    right = torch.randn(w.shape[1], 1, generator=g)
    return Delta({replica.handle.adapter.rewrite_path(layer): (left, right)}, {"seed": seed})


def measure_pauses(
    replica: Replica, n_versions: int, n_applies: int, threads: int, interval: float
) -> dict:
    layer = default_hparams(replica.handle).layer
    for seed in range(n_versions):
        delta = random_delta(replica, layer, seed)
        LedgerWriter(replica.ledger, replica).add_edits(
            [delta], [[{"bench": seed}]], replica.version
        )
    stop, tokens = threading.Event(), [0]

    def busy() -> None:
        while not stop.is_set():
            out = generate(replica, PROMPT, Sampling(max_new_tokens=16))
            tokens[0] += len(out.token_ids)

    workers = [threading.Thread(target=busy) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(2.0)  # let them reach steady decoding
    replica.applies.clear()
    for i in range(n_applies):
        assert replica.apply(i % (n_versions + 1))
        time.sleep(interval)
    stop.set()
    for w in workers:
        w.join()
    waits = [w for _, w, _ in replica.applies]
    holds = [h for _, _, h in replica.applies]
    return {
        "applies": n_applies,
        "generating_threads": threads,
        "seconds_between_applies": interval,
        "tokens_generated_meanwhile": tokens[0],
        "critical_section_ms": {
            "p50": ms(holds, 50, 3),
            "p99": ms(holds, 99, 3),
            "max": ms(holds, 100, 3),
        },
        "wait_for_running_steps_ms": {"p50": ms(waits, 50, 3), "p99": ms(waits, 99, 3)},
        "held_back_worst_case_ms": {
            "p50": ms([w + h for w, h in zip(waits, holds, strict=True)], 50, 3),
            "p99": ms([w + h for w, h in zip(waits, holds, strict=True)], 99, 3),
        },
    }


@torch.no_grad()
def measure_throughput(replica: Replica, new_tokens: int, reps: int) -> dict:
    handle = replica.handle
    ids = handle.tokenizer(PROMPT, return_tensors="pt").to(handle.device)
    ours, theirs = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = generate(replica, PROMPT, Sampling(max_new_tokens=new_tokens))
        ours.append((len(out.token_ids), time.perf_counter() - t))
        t = time.perf_counter()
        ref = handle.model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        theirs.append((ref.shape[1] - ids["input_ids"].shape[1], time.perf_counter() - t))
    ours_tps = [n / s for n, s in ours]
    theirs_tps = [n / s for n, s in theirs]
    same = out.text == handle.tokenizer.decode(
        ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return {
        "new_tokens": new_tokens,
        "reps": reps,
        "factpatch_tokens_per_s": round(statistics.median(ours_tps), 2),
        "transformers_tokens_per_s": round(statistics.median(theirs_tps), 2),
        "ratio": round(statistics.median(ours_tps) / statistics.median(theirs_tps), 3),
        "same_text": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--applies", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between applies")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()

    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, EmbeddedRedis(tmp) as server:
        replica = Replica(handle, Ledger(server.client(), "bench")).start()
        throughput = measure_throughput(replica, args.new_tokens, args.reps)
        pauses = measure_pauses(replica, args.versions, args.applies, args.threads, args.interval)
    result = {
        "model": handle.name,
        "device": str(handle.device),
        "dtype": str(handle.dtype),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "apply_pause": pauses,
        "throughput": throughput,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
