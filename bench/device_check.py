"""Does a GPU compute the same edit as the CPU?  Run by ``bench/device_check.sh`` on a machine
with CUDA (it needs one: there is nothing to compare without it).

For tiny random models of three families (the tests' fixtures), the same base weights on the
CPU in float32 and on ``--device`` in float32 and bfloat16: ROME's and MEMIT's deltas for the
same requests and seed, and an MLP causal trace.  Each (device, dtype) gets its own cache
folder, so its context templates and covariance are computed there too, as a worker on that
device would.  Printed and written: ‖Δ_gpu − Δ_cpu‖_F / ‖Δ_cpu‖_F per delta (ROME also without
context templates: they are sampled from the model, so any change of its numerics can change
the prompts the edit is optimised on), the largest
difference of the trace's probabilities, whether two computations on the device are
bit-identical (the determinism the ledger's reproducibility rests on), and whether the device
materialises the same deltas into the same bytes as the CPU (a CPU and a GPU replica verify the
same ledger hashes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from factpatch.editing import (
    Delta,
    base_weights,
    compute_edit,
    compute_memit,
    materialize,
)
from factpatch.models import ModelHandle, tensor_sha256, wrap_model
from factpatch.tracing import trace
from tests.conftest import REQUESTS, build_tiny, make_tokenizer
from tests.conftest import TINY_MEMIT as MEMIT
from tests.conftest import TINY_ROME as ROME


def moved(handle: ModelHandle, device: str, dtype: torch.dtype) -> ModelHandle:
    model = copy.deepcopy(handle.model).to(device, dtype)
    return wrap_model(model, handle.tokenizer, name=f"{handle.name}-{device}-{dtype}")


def dense(delta: Delta) -> dict[str, torch.Tensor]:
    return {p: delta.dense(p).double().cpu() for p in delta.factors}


def relative(a: Delta, b: Delta) -> float:
    da, db = dense(a), dense(b)
    num = sum(float((da[p] - db[p]).norm() ** 2) for p in db)
    den = sum(float(db[p].norm() ** 2) for p in db)
    return (num / den) ** 0.5


def identical(a: Delta, b: Delta) -> bool:
    return all(
        torch.equal(x, y)
        for p in a.factors
        for x, y in zip(a.factors[p], b.factors[p], strict=True)
    )


def materialized(handle: ModelHandle, deltas: list[Delta]) -> dict[str, str]:
    """Hashes of base + Σ deltas as a replica on ``handle``'s device would load them."""
    paths = sorted({p for d in deltas for p in d.factors})
    weights = materialize(handle, base_weights(handle, paths), deltas)
    return {p: tensor_sha256(w) for p, w in weights.items()}


def computations(handle: ModelHandle) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FACTPATCH_CACHE_DIR"] = cache
        rome = compute_edit(handle, REQUESTS[0], ROME)
        memit = compute_memit(handle, REQUESTS, MEMIT)
        again = compute_edit(handle, REQUESTS[0], ROME)
        bare = compute_edit(handle, REQUESTS[0], ROME.with_overrides(templates=()))
        traced = trace(handle, "Rome is the capital of", "Rome", kind="mlp", samples=4, window=3)
    return {"rome": rome, "memit": memit, "rome_again": again, "rome_bare": bare, "trace": traced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results/device_check.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here; run it where there is one")

    tokenizer = make_tokenizer()
    rows = []
    for family in ("llama", "gemma3", "gpt2"):
        cpu = build_tiny(family, tokenizer)
        reference = computations(cpu)
        for dtype in (torch.float32, torch.bfloat16):
            there = moved(cpu, args.device, dtype)
            other = computations(there)
            # The ledger's hashes: CPU and device replicas must load the same bytes.
            ledgered = [reference["rome"], reference["memit"]]
            same_bytes = materialized(there, ledgered) == materialized(
                moved(cpu, "cpu", dtype), ledgered
            )
            row = {
                "family": family,
                "dtype": str(dtype).removeprefix("torch."),
                "rome_rel_diff": relative(other["rome"], reference["rome"]),
                "memit_rel_diff": relative(other["memit"], reference["memit"]),
                "rome_rel_diff_no_templates": relative(other["rome_bare"], reference["rome_bare"]),
                "rome_repeat_bit_identical": identical(other["rome"], other["rome_again"]),
                "materialized_bytes_equal_cpu": same_bytes,
                "trace_max_abs_diff": float(
                    (other["trace"].matrix.float().cpu() - reference["trace"].matrix).abs().max()
                ),
            }
            print(json.dumps(row))
            rows.append(row)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "host": platform.machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
