"""Experiment record: weigh each text token's key by how much its layer's post-feed-forward
norm amplifies a change of the MLP output.

Gemma 3 normalises the MLP output before adding it to the residual: h += γ ⊙ y / rms(y),
y = W k.  A change ΔW moves the residual at a token by ≈ γ ⊙ ΔW k / rms(y) (first order, less
the component along y), so the text's mean squared change is tr(ΔW C_w ΔWᵀ) with
C_w = E[k kᵀ / rms(y)²] (γ weighs output rows alike for every token and does not change the
solve).  MEMIT's C = E[k kᵀ] weighs every token alike, so it under-protects tokens whose MLP
output is small.  This builds C_w from the same 100k tokens as C, scales it to C's trace (so
λ keeps its meaning on average), and re-solves the recorded MEMIT run with it
(research.memit_replay: the run's target values, keys exact).

    python -m research.experiments.postnorm_covariance results/seq1000/memit \\
        ../shared/data/counterfact/counterfact-val.json 3 '[{"cov": "w", "lam": 300}]'

One JSON line per grid point on stdout.  Results: research/NOTES.md.
"""

import json
import math
import sys
import time

import torch

from factpatch.corpus import load_corpus
from factpatch.editing import base_weights, load_weights
from factpatch.editing.covariance import read_text
from factpatch.evaluation.counterfact import summarise
from factpatch.evaluation.sequential import heldout_paragraphs, measure_records, perplexity
from factpatch.models.hooks import StopForward, thread_hooks
from factpatch.models.loading import load_model
from research.memit_replay import open_run, replay, run_covariance

PARAGRAPHS = 256


@torch.no_grad()
def weighted_covariance(handle, layer: int, n_tokens: int, max_len: int = 256):
    """(C, C_w, quantiles of rms(y)) over the corpus's first ``n_tokens`` tokens, float64."""
    norm = handle.module(f"{handle.adapter.blocks}.{layer}.post_feedforward_layernorm")
    eps = norm.eps
    module = handle.rewrite_module(layer)
    seen = {}

    def hook(_m, args, out):
        seen["k"], seen["y"] = args[0], out
        raise StopForward

    d = handle.rewrite_weight(layer).shape[1]
    plain = torch.zeros(d, d, dtype=torch.float64)
    weighted = torch.zeros(d, d, dtype=torch.float64)
    rms_all, count = [], 0
    with thread_hooks(forward=[(module, hook)]):
        for _ids, mask, take in read_text(handle, load_corpus(None).texts, n_tokens, max_len):
            keys = seen["k"][mask][:take].double().cpu()  # [n, d]
            rms2 = (seen["y"][mask][:take].double().pow(2).mean(-1) + eps).cpu()  # [n]
            plain.addmm_(keys.T, keys)
            weighted.addmm_(keys.T, keys / rms2[:, None])
            rms_all.append(rms2.sqrt())
            count += take
    rms = torch.cat(rms_all)
    q = torch.quantile(rms.float(), torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99]))
    return plain / count, weighted / count, [round(float(x), 3) for x in q], count


def main(run: str, data: str, batches: int, grid: list[dict]) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer = report["layers"][0]
    path = handle.adapter.rewrite_path(layer)
    t0 = time.perf_counter()
    plain, weighted, q, n = weighted_covariance(handle, layer, report["hparams"]["cov_tokens"])
    run_cov = run_covariance(handle, report).cpu()
    covs = {"plain": run_cov, "w": weighted * (torch.trace(plain) / torch.trace(weighted))}
    print(
        json.dumps(
            {
                "rms_quantiles_1_10_50_90_99": q,
                "tokens": n,
                "same_as_run_cov": bool(torch.allclose(plain, run_cov, rtol=1e-6)),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    base = base_weights(handle, [path])
    held, _ = heldout_paragraphs(None, PARAGRAPHS)
    for point in grid:
        t0 = time.perf_counter()
        weights = replay(handle, report, deltas, records, point["lam"], cov=covs[point["cov"]])
        change = weights[-1] - base[path].double()
        wear = {k: float(torch.trace(change @ c.to(change) @ change.T)) for k, c in covs.items()}
        load_weights(handle, {path: weights[-1]})
        line = {
            **point,
            "n_edits": len(records),
            "wear": wear,
            "update_ratio_per_fact": float(
                change.norm() / base[path].double().norm() / math.sqrt(len(records))
            ),
            "paragraphs": PARAGRAPHS,
            "perplexity": perplexity(handle, held),
            **summarise(measure_records(handle, records)),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        load_weights(handle, base)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
