"""Experiment record: does the covariance estimate's size set how much the edits wear the model?

MEMIT/ROME minimise λ·tr(ΔW C ΔWᵀ) + ‖ΔW K − R‖² with C estimated from text; the wear on other
text is tr(ΔW C_true ΔWᵀ).  With C from 100k tokens for a 2,048-wide key, the solve can put the
update where the *estimate* says text rarely goes.  This measures, for every checkpointed batch of
the target runs, tr(ΔW C ΔWᵀ) under C from 100k tokens (the default, what the solve used), from
1M tokens (paragraphs 0–9,776; the held-back 256 are never read) and from the held-back 256
paragraphs themselves (26k tokens, the text the perplexity is measured on).

    python -m research.experiments.covariance_size \\
        results/seq1000/memit results/seq1000/memit-clamp0.5

One JSON line per run and batch on stdout.  Results: research/NOTES.md.
"""

import json
import sys
import time

import torch

from factpatch.corpus import Corpus, load_corpus
from factpatch.editing.covariance import accumulate, layer_covariances
from factpatch.evaluation.sequential import checkpoint_deltas
from factpatch.models.loading import load_model

LAYER, HELD = 2, 256


def main(runs: list[str]) -> None:
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    path = handle.adapter.rewrite_path(LAYER)
    t0 = time.perf_counter()
    covs = {"100k": layer_covariances(handle, [LAYER], 100_000)[LAYER].cov}
    covs["1M"] = layer_covariances(handle, [LAYER], 1_000_000)[LAYER].cov
    print(json.dumps({"seconds_1M": round(time.perf_counter() - t0, 1)}), flush=True)
    texts = load_corpus(None).texts
    held = Corpus("held-back", texts[len(texts) - HELD :])
    covs["held"] = accumulate(handle, [LAYER], held, 10**9, 256, 8)[LAYER].cov
    for name, cov in covs.items():
        eig = torch.linalg.eigvalsh(cov)
        print(
            json.dumps(
                {
                    "cov": name,
                    "eig_min": eig[0].item(),
                    "eig_median": eig.median().item(),
                    "eig_max": eig[-1].item(),
                }
            ),
            flush=True,
        )
    for run in runs:
        for b, delta in enumerate(checkpoint_deltas(run)):
            left, right = (f.double() for f in delta.factors[path])  # ΔW = left @ right.T
            gram = left.T @ left  # [B, B]
            wear = {n: float(torch.trace(gram @ (right.T @ c @ right))) for n, c in covs.items()}
            print(json.dumps({"run": run, "batch": b + 1, **wear}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
