"""Re-measure the perplexity along a checkpointed sequential run on another held-back set:

    python -m research.remeasure results/seq1000/memit results/seq1000/rome \\
        --paragraphs 256 --out bench/results/remeasured_ppl256.jsonl

or, with ``--gate τ --data FILE``, every score of its points as a replica serving the same deltas
through key gates would give (:mod:`factpatch.editing.gate`; the deltas are what the run
computed, so this is the gated run itself, measured afterwards):

    python -m research.remeasure results/seq1000/memit-layer4-lam75-prior1 \\
        --gate 0.5 --data ../shared/data/counterfact/counterfact-val.json --out gated.jsonl

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

from factpatch.editing import Delta, base_weights, load_weights, materialize
from factpatch.editing.covariance import layer_covariances
from factpatch.editing.gate import gated
from factpatch.evaluation.counterfact import load_records, summarise
from factpatch.evaluation.sequential import (
    PPL_PARAGRAPHS,
    checkpoint_deltas,
    fluency,
    heldout_paragraphs,
    measure_records,
    perplexity,
    run_paragraphs,
)
from factpatch.models import load_model
from factpatch.models.loading import ModelHandle
from research.memit_sweep import emit


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
    report, deltas, ends = _open(folder)
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


def _open(folder: str | Path) -> tuple[dict[str, Any], list[Delta], list[int]]:
    """A run's progress, its deltas and the number of edits after each delta."""
    report = json.loads((Path(folder) / "progress.json").read_text())
    if report.get("refused"):
        raise ValueError(f"run: {folder} has refused edits; its points cannot be matched to deltas")
    deltas = checkpoint_deltas(folder)
    # Edits per delta: its facts (ROME: 1, MEMIT/AlphaEdit: its batch; keys fitted per context
    # count once per fact).
    ends = list(itertools.accumulate(d.factors[next(iter(d.factors))][0].shape[1] for d in deltas))
    return report, deltas, ends


def remeasure_gated(
    handle: ModelHandle,
    folder: str | Path,
    data: str | Path,
    threshold: float,
    points: list[int] | None = None,
    corpus: str | None = None,
) -> dict[str, Any]:
    """ES / PS / NS, perplexity and fluency at every point of a checkpointed run (or at the
    ``points`` given, in edits), each measured with the deltas up to it behind key gates of
    threshold τ on the unedited weights; the run's records, paragraphs and fluency prompts."""
    report, deltas, ends = _open(folder)
    records = load_records(data)[: report["n_edits_planned"]]
    paths = sorted({path for d in deltas for path in d.factors})
    base = base_weights(handle, paths)
    stats = layer_covariances(handle, report["layers"], report["hparams"]["cov_tokens"], corpus)
    covariances = {handle.adapter.rewrite_path(j): stats[j].cov for j in report["layers"]}
    held, _ = heldout_paragraphs(corpus, run_paragraphs(report))
    fl = report["unedited_fluency"]
    fl_prompts = [r["prompt"] for r in records[: fl["n_prompts"]]]
    out: dict[str, Any] = {  # a sequential report in its own right (plot.py draws it)
        "run": str(folder),
        "gate_threshold": threshold,
        **{k: report[k] for k in ("method", "batch", "hparams", "layers", "unedited")},
        "unedited_perplexity": report["unedited_perplexity"],
        "perplexity_paragraphs": report["perplexity_paragraphs"],
        "unedited_fluency": fl["ngram_entropy"],
        "curve": [],
    }
    for point in report.get("curve", []):
        n = point["n_edits"]
        if points is not None and n not in points:
            continue
        t0 = time.perf_counter()
        with gated(handle, base, deltas[: ends.index(n) + 1], covariances, threshold):
            measured = measure_records(handle, records[:n])
            ppl = perplexity(handle, held)
            entropy = fluency(handle, fl_prompts, fl["max_new_tokens"])["ngram_entropy"]
        out["curve"].append(
            {
                "n_edits": n,
                **summarise(measured),
                "unedited_neighborhood": summarise(report["unedited_records"][:n])["neighborhood"],
                "perplexity": ppl,
                "perplexity_change": ppl / report["unedited_perplexity"] - 1,
                "fluency": entropy,
                "fluency_change": entropy / fl["ngram_entropy"] - 1,
                "seconds": time.perf_counter() - t0,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="checkpoint folders of sequential runs")
    parser.add_argument("--paragraphs", type=int, default=PPL_PARAGRAPHS)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    parser.add_argument("--gate", type=float, default=None, help="τ: score every point gated")
    parser.add_argument("--data", default=None, help="with --gate: the runs' CounterFact JSON")
    parser.add_argument("--points", default=None, help="with --gate: e.g. 400,1000 (edits)")
    args = parser.parse_args(argv)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.gate is not None:
        if not args.data:
            parser.error("--gate needs --data (the runs' CounterFact JSON)")
        points = [int(p) for p in args.points.split(",")] if args.points else None
        for run in args.runs:
            result = remeasure_gated(handle, run, args.data, args.gate, points)
            emit({**result, "model": args.model}, args.out)
        return 0
    unedited = None  # the same for every run of one model
    for run in args.runs:
        t0 = time.perf_counter()
        result = remeasure_perplexity(handle, run, args.paragraphs, unedited=unedited)
        unedited = result["unedited_perplexity"]
        emit({**result, "model": args.model, "seconds": time.perf_counter() - t0}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
