"""Experiment record: the held-back tokens whose NLL an edited model raised most, with their
context and the unedited / edited models' top prediction (companion to wear_tokens.py).

    python -m research.experiments.wear_top_tokens results/seq1000/memit \\
        > research/results/wear_top_tokens_memit300.txt

Prints the edited model's top prediction at the worst 1 % of tokens (counted), the run's most
frequent target objects, and the worst 40 tokens.  Results: research/NOTES.md.
"""

import collections
import sys

from wear_tokens import PARAGRAPHS, predictions

from factpatch.editing import base_weights, load_weights, materialize
from factpatch.evaluation.counterfact import load_records
from factpatch.evaluation.sequential import (
    checkpoint_deltas,
    heldout_paragraphs,
)
from factpatch.models.loading import load_model

DATA = "../shared/data/counterfact/counterfact-val.json"


def main(run: str) -> None:
    handle = load_model("gemma-3-270m", device=None, dtype="float32")
    tok = handle.tokenizer
    texts, _ = heldout_paragraphs(None, PARAGRAPHS)
    before = predictions(handle, texts)
    deltas = checkpoint_deltas(run)
    paths = sorted({p for d in deltas for p in d.factors})
    base = base_weights(handle, paths)
    load_weights(handle, materialize(handle, base, deltas))
    after = predictions(handle, texts)
    load_weights(handle, base)
    n_edits = sum(d.factors[paths[0]][0].shape[1] for d in deltas)
    targets = collections.Counter(r["target_new"] for r in load_records(DATA)[:n_edits])
    items = []
    for (seq, nll_b, top_b), (_, nll_a, top_a) in zip(before, after, strict=True):
        for i in range(len(nll_b)):
            items.append((float(nll_a[i] - nll_b[i]), i, seq, int(top_b[i]), int(top_a[i])))
    items.sort(key=lambda item: item[0], reverse=True)
    new_top = collections.Counter(tok.decode([a]) for *_, a in items[: len(items) // 100])
    print("top1% new argmax:", new_top.most_common(25))
    print("targets:", targets.most_common(25))
    for d, i, seq, b, a in items[:40]:
        ctx = tok.decode(seq[max(0, i - 12) : i + 1]).replace("\n", " ")
        print(
            f"{d:6.2f} | {ctx[-70:]!r} -> {tok.decode([seq[i + 1]])!r} | "
            f"before {tok.decode([b])!r} after {tok.decode([a])!r}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
