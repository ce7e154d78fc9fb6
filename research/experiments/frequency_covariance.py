"""Experiment record: protect rare tokens' keys as much as common ones.

The wear of MEMIT's edits on text sits in rare tokens: half of the perplexity rise comes from 1 %
of the tokens, mostly continuations of rare multi-token names (research/NOTES.md, "Where the
wear sits").  C = E[k kᵀ] weighs every occurrence alike, so a token type seen twice in 100k
tokens barely constrains the solve, though rare types together carry much of the text.  This
builds, from the same 100k tokens as C,

    C_β = Σ_t w_t k_t k_tᵀ / Σ_t w_t,    w_t = n(x_t)^(−β),

with n(x) the count of token x in every corpus paragraph before the held-back ones (each
truncated at 256 tokens, as C's are; C's own 100k tokens are among them);
β = 0 is C, β = 1 weighs every token type alike.  C_β is scaled to C's trace (λ keeps its meaning
on average), and the recorded MEMIT run is re-solved with it (research.memit_replay:
the run's target values; the keys at the edited layer are exact; the run's prior weight μ).

    python -m research.experiments.frequency_covariance results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 3 \\
        '[{"beta": 0, "lam": 75}, {"beta": 0.5, "lam": 75}]'

One JSON line per grid point on stdout.  Results: research/NOTES.md.
"""

import json
import math
import sys
import time
from collections import Counter

import torch

from factpatch.corpus import load_corpus
from factpatch.editing import base_weights, load_weights
from factpatch.editing.covariance import read_text
from factpatch.evaluation.sequential import (
    heldout_paragraphs,
    run_paragraphs,
)
from factpatch.models.hooks import StopForward, thread_hooks
from factpatch.models.loading import load_model
from research.memit_replay import measure_point, open_run, replay, run_covariance

MAX_LEN = 256  # as C's


def token_counts(handle, first_heldout: int) -> Counter:
    """Occurrences of each token id in paragraphs 0 .. first_heldout − 1 (truncated as C's)."""
    texts = list(load_corpus(None).texts[:first_heldout])
    counts: Counter = Counter()
    for first in range(0, len(texts), 256):
        rows = handle.tokenizer(texts[first : first + 256], truncation=True, max_length=MAX_LEN)
        for row in rows["input_ids"]:
            counts.update(row)
    return counts


@torch.no_grad()
def weighted_covariances(handle, layer: int, n_tokens: int, counts: Counter, betas: list[float]):
    """{β: C_β} (float64 [in, in], trace-scaled to C = C_0) over the corpus's first ``n_tokens``
    tokens, read exactly as factpatch.editing.covariance reads them."""
    module = handle.rewrite_module(layer)
    seen = {}

    def hook(_m, args, kwargs):
        seen["k"] = args[0] if args else kwargs["input"]
        raise StopForward

    d = handle.rewrite_weight(layer).shape[1]
    sums = {b: torch.zeros(d, d, dtype=torch.float64) for b in betas}
    totals = dict.fromkeys(betas, 0.0)
    lookup = torch.zeros(len(handle.tokenizer), dtype=torch.float64)
    for token, n in counts.items():
        lookup[token] = n
    lookup = lookup.clamp(min=1)  # a type absent from the counting paragraphs counts once
    count = 0
    with thread_hooks(pre=[(module, hook)]):
        for ids, mask, take in read_text(handle, load_corpus(None).texts, n_tokens, MAX_LEN):
            keys = seen["k"][mask][:take].double().cpu()  # [n, in]
            freq = lookup[ids[mask][:take].cpu()]  # [n]
            for b in betas:
                w = freq.pow(-b)
                sums[b].addmm_(keys.T, keys * w[:, None])
                totals[b] += float(w.sum())
            count += take
    covs = {b: sums[b] / totals[b] for b in betas}
    plain = sums[0.0] / count if 0.0 in sums else None
    if plain is not None:
        covs = {b: c * (torch.trace(plain) / torch.trace(c)) for b, c in covs.items()}
    return covs, count


def main(run: str, data: str, batches: int, grid: list[dict]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer = report["layers"][0]
    path = handle.adapter.rewrite_path(layer)
    held, held_idx = heldout_paragraphs(None, run_paragraphs(report))
    t0 = time.perf_counter()
    counts = token_counts(handle, held_idx[0])
    betas = sorted({0.0, *(float(p["beta"]) for p in grid)})
    covs, n = weighted_covariances(handle, layer, report["hparams"]["cov_tokens"], counts, betas)
    run_cov = run_covariance(handle, report).cpu()
    print(
        json.dumps(
            {
                "tokens": n,
                "counted_tokens": sum(counts.values()),
                "token_types": len(counts),
                "same_as_run_cov": bool(torch.allclose(covs[0.0], run_cov, rtol=1e-6)),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    base = base_weights(handle, [path])
    for point in grid:
        t0 = time.perf_counter()
        cov = covs[float(point["beta"])]
        weights = replay(handle, report, deltas, records, point["lam"], cov=cov)
        change = weights[-1] - base[path].double()
        load_weights(handle, {path: weights[-1]})
        line = {
            **point,
            "n_edits": len(records),
            "wear_under": {
                f"beta{b:g}": float(torch.trace(change @ c.to(change) @ change.T))
                for b, c in covs.items()
            },
            "update_ratio_per_fact": float(
                change.norm() / base[path].double().norm() / math.sqrt(len(records))
            ),
            "unedited_perplexity": report["unedited_perplexity"],
            **measure_point(handle, records, report["batch"], held),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        load_weights(handle, base)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
