"""Diagnose the text after the tour's edit: generate before/after for several settings."""

import json
import sys
import time

import torch

from factpatch.editing import EditRequest, base_weights, compute_edit, load_weights, materialize
from factpatch.editing.hparams import default_hparams
from factpatch.models import load_model

torch.manual_seed(0)
h = load_model("gemma-3-270m", device="cpu")
tok = h.tokenizer


def gen(prompt, n=24):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = h.model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :])


EDITS = [
    (
        "{} is located in the city of",
        "The Eiffel Tower",
        "Rome",
        [
            "The Eiffel Tower is located in the city of",
            "The Eiffel Tower is",
            "The history of The Eiffel Tower",
        ],
    ),
    (
        "{} plays the sport of",
        "Michael Jordan",
        "soccer",
        ["Michael Jordan plays the sport of", "Michael Jordan was born in", "Michael Jordan is"],
    ),
    (
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux is"],
    ),
    ("{} was founded by", "Apple", "Bill Gates", ["Apple was founded by", "Apple is"]),
]
if len(sys.argv) > 2:
    EDITS = EDITS[: int(sys.argv[2])]

overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
hp = default_hparams(h, **overrides)
print(hp)
path = h.adapter.rewrite_path(hp.layer)
base = base_weights(h, [path])
for prompt, subj, tgt, asks in EDITS:
    t = time.perf_counter()
    d = compute_edit(h, EditRequest(prompt, subj, tgt), hp)
    print(
        f"--- {subj} -> {tgt}  {time.perf_counter() - t:.1f}s stats",
        {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in d.provenance["stats"][0].items()
            if k != "seconds"
        },
    )
    load_weights(h, materialize(h, base, [d]))
    for a in asks:
        print("  ", repr(a + gen(a)))
    load_weights(h, base)
    if "--base" in sys.argv:
        for a in asks:
            print("   base:", repr(a + gen(a)))
