"""Experiment record: what a gate on the edited layer's update would buy.

A weight edit is linear: every token's key k gets ΔW k, the edited subjects' and every other
name piece's alike, and the perplexity rise sits in those other names (research/NOTES.md, "Where
the wear sits").  Lifelong-editing methods with a router (GRACE, Hartvigsen et al. 2023; WISE,
Wang et al. 2024) apply their change only where a token's activation is close to an edit's.  This
measures the best such a gate could do for a recorded sequential MEMIT run, before building
anything: the run's accumulated update (replayed, :func:`research.memit_replay.replay`,
the run's own λ) is applied by a forward hook on the edited layer's output projection as

    y = W₀ k + g(k) · ΔW k,    g(k) = 1[score(k) > τ]

with the score (grid key ``gate``) either the response norm ‖ΔW k‖ ("response") or the largest
cosine between the whitened key C^{-½}k and the edits' whitened keys C^{-½}k̄ᵢ ("key"; GRACE's
deferral radius in the metric the solve uses; the engine's form is factpatch/editing/gate.py).
With τ = −∞ it is the run's model.

    python -m research.experiments.gated_update results/seq1000/memit-layer4-lam75-prior1 \\
        ../shared/data/counterfact/counterfact-val.json 4 '[{"gate": "key", "tau": 0.5}]'

A point may set ``lam``: the run re-solved at that λ with its targets, then gated (the replay's
approximation).  ``--no-quantiles`` after the grid skips the first pass.  First lines: the score's
quantiles over held-back text tokens and over the edit, paraphrase and
neighbourhood prompts (each prompt's largest score); then one JSON line per grid point, with the
share of those text tokens the gate lets through.  Results: research/NOTES.md.
"""

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from factpatch.editing import base_weights
from factpatch.evaluation.sequential import heldout_paragraphs, run_paragraphs
from factpatch.models.loading import load_model
from research.memit_replay import measure_point, open_run, replay, run_covariance

QUANTILES = [0.5, 0.9, 0.99, 0.999]


class Gate:
    """Forward hook adding g(k)·ΔW k to the output projection's output; ``recorded``, when a
    list, collects every position's score."""

    def __init__(self, change: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]):
        self.change, self.score = change, score  # ΔW [out, in]
        self.tau = float("-inf")
        self.recorded: list[torch.Tensor] | None = None

    def __call__(self, module, inputs, output):
        keys = inputs[0]  # [..., in]
        scores = self.score(keys)  # [...]
        if self.recorded is not None:
            self.recorded.append(scores.detach().flatten().cpu())
        on = scores > self.tau
        return output + on[..., None].to(output.dtype) * (keys @ self.change.T)


def scores_of(handle, gate: Gate, texts: list[str]) -> list[torch.Tensor]:
    """Every position's score in each text (one text per pass: no padding), first 128 tokens."""
    out = []
    with torch.no_grad():
        for text in texts:
            gate.recorded = []
            ids = handle.tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            handle.model(**ids.to(handle.device))
            out.append(torch.cat(gate.recorded))
    gate.recorded = None
    return out


def main(run: str, data: str, batches: int, grid: list[dict[str, Any]], quantiles: bool) -> None:
    report, deltas, records = open_run(run, data, batches)
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    layer, batch = report["layers"][0], report["batch"]
    path = handle.adapter.rewrite_path(layer)
    weight0 = base_weights(handle, [path])[path].double()
    cov = run_covariance(handle, report).double()
    lam_run = float(report["hparams"]["mom2_update_weight"])
    changes: dict[float, torch.Tensor] = {}

    def change_at(lam: float) -> torch.Tensor:
        """ΔW of the run re-solved at λ (the run's own λ: the run's update)."""
        if lam not in changes:
            weights = replay(handle, report, deltas, records, lam, cov=cov)[-1]
            changes[lam] = (weights - weight0).float()
        return changes[lam]

    change = change_at(lam_run)
    evals, evecs = torch.linalg.eigh(cov)
    whiten = (evecs * evals.clamp_min(1e-12).rsqrt()).float()  # [in, in]: k ↦ kᵀ C^{-½}
    edited = torch.cat([d.keys[path].float() for d in deltas], 1).T @ whiten  # [N, in]
    edited = edited / edited.norm(dim=1, keepdim=True)

    def key_score(keys: torch.Tensor) -> torch.Tensor:
        w = keys @ whiten
        return (w @ edited.T).amax(-1) / w.norm(dim=-1).clamp_min(1e-12)

    def response_score(keys: torch.Tensor) -> torch.Tensor:
        return (keys @ change.T).norm(dim=-1)

    scores = {"key": key_score, "response": response_score}
    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    module = handle.module(path)
    text_scores: dict[str, torch.Tensor] = {}
    for name, fn in scores.items() if quantiles else ():
        gate = Gate(change, fn)
        hook = module.register_forward_hook(gate)
        text = torch.cat(scores_of(handle, gate, held[:32]))
        text_scores[name] = text
        line = {"gate": name, "text_tokens": int(text.numel())}
        line["text"] = torch.quantile(text, torch.tensor(QUANTILES)).tolist()
        for field in ("prompt", "rephrase_prompt", "locality_prompt"):
            top = torch.stack(
                [s.max() for s in scores_of(handle, gate, [r[field] for r in records])]
            )
            line[field] = torch.quantile(top, torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99])).tolist()
        hook.remove()
        print(json.dumps({"quantiles": line}), flush=True)

    for point in grid:
        t0 = time.perf_counter()
        lam = float(point.get("lam", lam_run))
        gate = Gate(change_at(lam), scores[point["gate"]])
        gate.tau = float(point["tau"])
        hook = module.register_forward_hook(gate)
        ppl_seen = measure_point(handle, records, batch, held)
        hook.remove()
        line = {
            **point,
            "n_edits": len(records),
            "lam": lam,
            "text_through": (
                float((text_scores[point["gate"]] > gate.tau).float().mean())
                if text_scores
                else None
            ),
            "unedited_perplexity": report["unedited_perplexity"],
            **ppl_seen,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        line["perplexity_change"] = line["perplexity"] / line["unedited_perplexity"] - 1
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    quantiles = sys.argv[5:] != ["--no-quantiles"]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), quantiles)
