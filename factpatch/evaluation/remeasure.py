"""Re-measure the perplexity along a checkpointed sequential run on another held-back set:

    python -m factpatch.evaluation.remeasure results/seq1000/memit results/seq1000/rome \\
        --paragraphs 256 --out bench/results/remeasured_ppl256.jsonl

Each point's model is rebuilt exactly as the run built it (``base + Σ`` the deltas up to that
point, :func:`factpatch.editing.materialize`), so with the run's own paragraphs the recorded
perplexities come back unchanged (tested).  Written for the first runs, whose 16 paragraphs
(≈ 2,000 tokens) were too few to rank settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from factpatch.editing import base_weights, load_weights, materialize
from factpatch.evaluation.memit_sweep import emit
from factpatch.evaluation.sequential import (
    PPL_PARAGRAPHS,
    checkpoint_deltas,
    heldout_paragraphs,
    perplexity,
)
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle


def remeasure_perplexity(
    handle: ModelHandle,
    folder: str | Path,
    paragraphs: int,
    corpus: str | None = None,
    unedited: float | None = None,
) -> dict[str, Any]:
    """Perplexity on the last ``paragraphs`` held-back paragraphs of the unedited model (unless
    given as ``unedited``) and of the model at every point of a checkpointed run (``base + Σ``
    the deltas up to that point, materialised as in the run); the weights are restored at the
    end."""
    report = json.loads((Path(folder) / "progress.json").read_text())
    if report.get("refused"):
        raise ValueError(f"run: {folder} has refused edits; its points cannot be matched to deltas")
    deltas = checkpoint_deltas(folder)
    # Edits per delta: the width of its keys (ROME: 1, MEMIT/AlphaEdit: its batch).
    ends = list(itertools.accumulate(max(k.shape[1] for k in d.keys.values()) for d in deltas))
    paths = sorted({path for d in deltas for path in d.factors})
    base = base_weights(handle, paths)
    held, held_idx = heldout_paragraphs(corpus, paragraphs)
    out: dict[str, Any] = {
        "run": str(folder),
        "method": report["method"],
        "corpus_indices": [held_idx[0], held_idx[-1]],
        "unedited_perplexity": perplexity(handle, held) if unedited is None else unedited,
        "curve": [],
    }
    try:
        for point in report.get("curve", []):
            load_weights(
                handle, materialize(handle, base, deltas[: ends.index(point["n_edits"]) + 1])
            )
            out["curve"].append(
                {"n_edits": point["n_edits"], "perplexity": perplexity(handle, held)}
            )
    finally:
        load_weights(handle, base)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="checkpoint folders of sequential runs")
    parser.add_argument("--paragraphs", type=int, default=PPL_PARAGRAPHS)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    args = parser.parse_args(argv)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    unedited = None  # the same for every run of one model
    for run in args.runs:
        t0 = time.perf_counter()
        result = remeasure_perplexity(handle, run, args.paragraphs, unedited=unedited)
        unedited = result["unedited_perplexity"]
        emit({**result, "model": args.model, "seconds": time.perf_counter() - t0}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
