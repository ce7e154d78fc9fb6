"""Text after an edit (issue 24): ES/PS/NS and the text measures for several ROME settings on
the same records, the unedited measures taken once per record.  One JSON line per record and
setting, written as it goes.

    python research/text_after_edit.py --data ../shared/data/counterfact/counterfact-train.json \
        --known-facts 20 --out research/results/text_known_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

from factpatch.editing import base_weights, compute_edit, load_weights, materialize
from factpatch.editing.hparams import default_hparams
from factpatch.evaluation.counterfact import (
    known_facts,
    load_records,
    measure,
    request_for,
    text_measures,
)
from factpatch.evaluation.generation import essence_kept, essence_probes
from factpatch.models import load_model

SETTINGS = {
    "paper": {"essence_tokens": 0, "continuation_tokens": 0, "kl_factor": 0.0625},
    "kept-text": {"essence_tokens": 16, "continuation_tokens": 4, "kl_factor": 0.5},
    "kept-text-kl0.25": {"essence_tokens": 16, "continuation_tokens": 4, "kl_factor": 0.25},
    "continuation-kl0.25": {"essence_tokens": 0, "continuation_tokens": 4, "kl_factor": 0.25},
    "paper-clamp4": {
        "essence_tokens": 0,
        "continuation_tokens": 0,
        "kl_factor": 0.0625,
        "clamp_norm_factor": 4.0,
    },
}
# The same, with the δ optimisation on a bfloat16 copy (issue 28), and the subject's other
# questions (essence_questions).
BF16 = {"optimise_dtype": "bfloat16"}
SETTINGS |= {
    "paper-bf16": SETTINGS["paper"] | BF16,
    "continuation-kl0.25-bf16": SETTINGS["continuation-kl0.25"] | BF16,
    "questions8-kl0.25-bf16": SETTINGS["paper"]
    | BF16
    | {"essence_questions": 8, "kl_factor": 0.25},
    "questions8-continuation-kl0.25-bf16": SETTINGS["continuation-kl0.25"]
    | BF16
    | {"essence_questions": 8},
    # The questions at the paper's KL factor (0.0625).
    "questions8-bf16": SETTINGS["paper"] | BF16 | {"essence_questions": 8},
    # The questions with the reference's 20 context templates (10 of 10 tokens, 10 of 5): more
    # prefixed prompts for the rewrite term, against the paraphrase loss the questions cost.
    "questions8-kl0.25-t20-bf16": SETTINGS["paper"]
    | BF16
    | {"essence_questions": 8, "kl_factor": 0.25, "templates": [[10, 10], [5, 10]]},
    # A smaller ‖δ‖ bound: under Gemma 3's post-feed-forward norm δ turns the MLP output's
    # direction rather than adding to it, so a smaller δ may keep more of the subject.
    "paper-clamp0.5-bf16": SETTINGS["paper"] | BF16 | {"clamp_norm_factor": 0.5},
    "paper-clamp0.75-bf16": SETTINGS["paper"] | BF16 | {"clamp_norm_factor": 0.75},
    "questions8-clamp0.5-bf16": SETTINGS["paper"]
    | BF16
    | {"essence_questions": 8, "clamp_norm_factor": 0.5},
    "paper-clamp0.5": SETTINGS["paper"] | {"clamp_norm_factor": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--known", default="../shared/data/known/known_1000.json")
    parser.add_argument("--known-facts", type=int, help="first N records the model ranks first")
    parser.add_argument("--n", type=int, help="first N records")
    parser.add_argument("--settings", default="paper,kept-text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    handle = load_model("gemma-3-270m", device="cpu")
    records = load_records(args.data)
    records = (
        known_facts(handle, records, args.known_facts) if args.known_facts else records[: args.n]
    )
    known = load_records(args.known)
    names = args.settings.split(",")
    hps = {name: default_hparams(handle, **SETTINGS[name]) for name in names}
    path = handle.adapter.rewrite_path(hps[names[0]].layer)
    base = base_weights(handle, [path])
    with open(args.out, "a") as out:
        for record in records:
            objects = (record["ground_truth"], record["target_new"])
            probes = essence_probes(
                handle.model, handle.tokenizer, record["subject"], known, exclude=objects
            )
            before = {
                "scores": measure(handle, record),
                "text": text_measures(handle, record, record["ground_truth"]),
            }
            for name in names:
                started = time.perf_counter()
                delta = compute_edit(handle, request_for(record), hps[name])
                seconds = time.perf_counter() - started
                load_weights(handle, materialize(handle, base, [delta]))
                after = {
                    "scores": measure(handle, record),
                    "text": text_measures(handle, record, record["target_new"]),
                    "essence_kept": essence_kept(handle.model, handle.tokenizer, probes),
                }
                load_weights(handle, base)
                line = {
                    "case_id": record.get("case_id"),
                    "setting": name,
                    "hparams": hps[name].to_dict(),
                    "seconds": seconds,
                    "essence_probes": len(probes),
                    "before": before,
                    "after": after,
                }
                out.write(json.dumps(line) + "\n")
                out.flush()
                t = after["text"]
                print(
                    f"{record.get('case_id')} {name}: {seconds:.1f}s "
                    f"degenerate {t['degenerate']:.2f} "
                    f"(before {before['text']['degenerate']:.2f}) essence {after['essence_kept']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
