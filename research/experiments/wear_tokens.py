"""Experiment record: where in the held-back text does an edited model's perplexity rise?

Per-token NLL of the unedited model and of each run's edited model (base + Σ its checkpointed
deltas, materialised as the run does) on the 256 held-back paragraphs; how the rise is spread
over tokens and paragraphs, and how much of it sits in paragraphs that name an edited subject
(there a rise is the edit doing its job: the text states the old fact).

    python -m research.experiments.wear_tokens ../shared/data/counterfact/counterfact-val.json \\
        results/seq1000/memit results/seq1000/memit-clamp0.5 results/seq1000/rome

One JSON line per run on stdout.  Results: research/NOTES.md.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from factpatch.editing import base_weights, load_weights, materialize
from factpatch.editing.prompts import pad_batch
from factpatch.evaluation.counterfact import load_records
from factpatch.evaluation.sequential import (
    checkpoint_deltas,
    final_hidden,
    heldout_paragraphs,
)
from factpatch.models.loading import load_model

PARAGRAPHS = 256


@torch.no_grad()
def predictions(handle, texts: list[str], max_len: int = 128) -> list[tuple]:
    """Per paragraph: (token ids, NLL of every predicted token, the model's top prediction at
    every position), the tokens and positions as sequential.perplexity reads them."""
    tok, out = handle.tokenizer, []
    for first in range(0, len(texts), 4):
        rows = [
            tok(t, truncation=True, max_length=max_len)["input_ids"]
            for t in texts[first : first + 4]
        ]
        hidden = final_hidden(handle, pad_batch(rows, tok.pad_token_id, handle.device))
        for row, seq in enumerate(rows):
            logits = handle.head_logits(hidden[row, : len(seq) - 1]).float()
            target = torch.tensor(seq[1:], device=handle.device)
            nll = F.cross_entropy(logits, target, reduction="none").cpu().double()
            out.append((seq, nll, logits.argmax(-1).cpu()))
    return out


def token_nll(handle, texts: list[str]) -> list[torch.Tensor]:
    """NLL of every predicted token, one tensor per paragraph."""
    return [nll for _, nll, _ in predictions(handle, texts)]


def main(data: str, runs: list[str]) -> None:
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    texts, _ = heldout_paragraphs(None, PARAGRAPHS)
    records = load_records(data)
    before = token_nll(handle, texts)
    n_tokens = sum(len(t) for t in before)
    for run in runs:
        deltas = checkpoint_deltas(run)
        report = json.loads(Path(run, "progress.json").read_text())
        n_edits = report["curve"][-1]["n_edits"]
        subjects = {r["subject"] for r in records[:n_edits]}
        paths = sorted({p for d in deltas for p in d.factors})
        base = base_weights(handle, paths)
        load_weights(handle, materialize(handle, base, deltas))
        after = token_nll(handle, texts)
        load_weights(handle, base)
        diff = torch.cat([a - b for a, b in zip(after, before, strict=True)])  # [tokens]
        total = float(diff.sum())
        ranked = diff.sort(descending=True).values
        per_par = torch.tensor([float((a - b).sum()) for a, b in zip(after, before, strict=True)])
        naming = [any(s in t for s in subjects) for t in texts]
        first3 = float(sum((a - b)[:3].sum() for a, b in zip(after, before, strict=True)))
        worst = per_par.argsort(descending=True)[:5].tolist()
        print(
            json.dumps(
                {
                    "run": run,
                    "n_edits": n_edits,
                    "tokens": n_tokens,
                    "ppl_ratio": float(torch.exp(diff.mean())),
                    "tokens_worse": float((diff > 0).double().mean()),
                    "median_dnll": float(diff.median()),
                    "share_top1pct": float(ranked[: n_tokens // 100].sum()) / total,
                    "share_top10pct": float(ranked[: n_tokens // 10].sum()) / total,
                    "share_top10_paragraphs": float(per_par.sort(descending=True).values[:10].sum())
                    / total,
                    "paragraphs_naming_subject": sum(naming),
                    "share_naming_subject": float(per_par[torch.tensor(naming)].sum()) / total,
                    "share_first3_positions": first3 / total,
                    "worst_paragraphs": [
                        [i, round(float(per_par[i]), 2), texts[i][:80]] for i in worst
                    ],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
