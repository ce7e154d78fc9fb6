"""Single-edit CounterFact evaluation (Meng et al. 2022, sec. 4.2 and appendix).

For each record: measure the unedited model, compute the edit, put it into the weights, measure
again, then restore the base weights exactly (each edit is judged alone, on a fresh copy of the
base).  P(target | prompt) = exp(−mean token NLL of " " + target after the prompt).

* Efficacy: % records whose rewrite prompt gives P(new) > P(true).
* Paraphrase: the same on the rephrased prompt.
* Neighborhood: % records whose neighbour prompt (another subject with the true attribute)
  gives P(neighbour's true answer) > P(new).
* Magnitudes: mean P(new) − P(true) (rewrite, paraphrase) and mean P(true) − P(new) (neighbour).
* Score: harmonic mean of efficacy, paraphrase and neighborhood.

With ``text=True`` the text itself is judged too, before and after each edit
(:mod:`factpatch.evaluation.generation`): fluency (ROME's n-gram entropy of greedy and top-5
sampled continuations of prompts about the subject), degeneration (special tokens, loops, low
diversity), consistency (continuations of the record's own prompts that name the new object)
and essence (the subject's other facts still answered as before).  ``known_facts`` keeps only
records whose true object the unedited model ranks first: the facts people will correct.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factpatch.editing import (
    DegenerateEditError,
    EditRequest,
    RomeHParams,
    base_weights,
    compute_edit,
    load_weights,
    materialize,
)
from factpatch.editing.prompts import continuation, continuation_logprobs
from factpatch.evaluation.generation import essence_kept, essence_probes, text_report
from factpatch.models.loading import ModelHandle


def load_records(path: str | Path, n: int | None = None) -> list[dict[str, Any]]:
    records = json.loads(Path(path).read_text())
    return records[:n] if n else records


@dataclass
class RecordResult:
    case_id: Any
    before: dict[str, float]
    after: dict[str, float]
    seconds: float
    refused: str | None = None
    text: dict[str, Any] | None = None  # with text=True: the text measures before and after


def measure(handle: ModelHandle, record: dict[str, Any]) -> dict[str, float]:
    """P(new) and P(true) on the rewrite, paraphrase and neighbour prompts."""
    new, true, loc_true = (
        record["target_new"],
        record["ground_truth"],
        record["locality_ground_truth"],
    )
    pairs = [
        (record["prompt"], new),
        (record["prompt"], true),
        (record["rephrase_prompt"], new),
        (record["rephrase_prompt"], true),
        (record["locality_prompt"], new),
        (record["locality_prompt"], loc_true),
    ]
    probs = [
        math.exp(lp)
        for lp in continuation_logprobs(handle.model, handle.tokenizer, pairs, handle.device)
    ]
    keys = ("rewrite_new", "rewrite_true", "para_new", "para_true", "nb_new", "nb_true")
    return dict(zip(keys, probs, strict=True))


def summarise(results: list[dict[str, float]]) -> dict[str, float]:
    def pct(flags: list[bool]) -> float:
        return 100.0 * sum(flags) / len(flags)

    es = pct([r["rewrite_new"] > r["rewrite_true"] for r in results])
    ps = pct([r["para_new"] > r["para_true"] for r in results])
    ns = pct([r["nb_true"] > r["nb_new"] for r in results])
    score = statistics.harmonic_mean([es, ps, ns]) if min(es, ps, ns) > 0 else 0.0
    return {
        "efficacy": es,
        "paraphrase": ps,
        "neighborhood": ns,
        "score": score,
        "efficacy_magnitude": statistics.fmean(
            r["rewrite_new"] - r["rewrite_true"] for r in results
        ),
        "paraphrase_magnitude": statistics.fmean(r["para_new"] - r["para_true"] for r in results),
        "neighborhood_magnitude": statistics.fmean(r["nb_true"] - r["nb_new"] for r in results),
    }


def summarise_text(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the per-record text measures; ``ratio`` is after / before."""

    def mean(when: str, key: str) -> float:
        return statistics.fmean(r[when][key] for r in records)

    out: dict[str, Any] = {}
    for key in ("fluency_greedy", "fluency_sampled", "degenerate"):
        before, after = mean("before", key), mean("after", key)
        out[key] = {"before": before, "after": after}
        if key != "degenerate":
            out[key]["ratio"] = after / before if before else None
    out["consistency"] = {
        "before_true": mean("before", "consistency"),
        "after_new": mean("after", "consistency"),
    }
    kept = [r["essence_kept"] for r in records if r["essence_kept"] is not None]
    out["essence_kept"] = statistics.fmean(kept) if kept else None
    out["essence_probes"] = sum(r["essence_probes"] for r in records)
    return out


def as_facts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CounterFact records as (subject, prompt, attribute = true object) facts: a record's
    subject may have other relations elsewhere in the set, which an edit should leave alone."""
    return [
        {"subject": r["subject"], "prompt": r["prompt"], "attribute": r["ground_truth"]}
        for r in records
    ]


@torch.no_grad()
def ranks_first(handle: ModelHandle, record: dict[str, Any]) -> bool:
    """True when the unedited model's top next token after the prompt starts the true object."""
    ids, n_prompt = continuation(handle.tokenizer, record["prompt"], record["ground_truth"])
    logits = handle.model(input_ids=torch.tensor([ids[:n_prompt]], device=handle.device)).logits
    return int(logits[0, -1].argmax()) == ids[n_prompt]


def known_facts(
    handle: ModelHandle, records: list[dict[str, Any]], n: int | None
) -> list[dict[str, Any]]:
    """The first ``n`` records (all if None) whose true object the unedited model ranks first."""
    kept = []
    for record in records:
        if ranks_first(handle, record):
            kept.append(record)
            if n is not None and len(kept) == n:
                break
    return kept


def text_measures(handle: ModelHandle, record: dict[str, Any], answer: str) -> dict[str, Any]:
    report, generations = text_report(handle.model, handle.tokenizer, record, answer)
    out = dict(report.__dict__)
    out["greedy"] = [g.text for g in generations[: len(generations) // 2]]
    return out


def request_for(record: dict[str, Any]) -> EditRequest:
    return EditRequest.from_prompt(
        record["prompt"], record["subject"], record["target_new"], record["ground_truth"]
    )


@dataclass
class Evaluation:
    records: list[RecordResult] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        seconds = [r.seconds for r in self.records]
        out = summarise([r.after for r in self.records])
        texts = [r.text for r in self.records if r.text is not None]
        if texts:
            out["text"] = summarise_text(texts)
        out.update(
            n=len(self.records),
            refused=sum(r.refused is not None for r in self.records),
            seconds_per_edit=statistics.fmean(seconds),
            median_seconds_per_edit=statistics.median(seconds),
            unedited=summarise([r.before for r in self.records]),
        )
        return out


def evaluate(
    handle: ModelHandle,
    records: list[dict[str, Any]],
    hparams: RomeHParams,
    *,
    corpus: str | None = None,
    progress: bool = True,
    text: bool = False,
    known: list[dict[str, Any]] | None = None,
) -> Evaluation:
    """Edit each record alone on the base weights; restore them exactly after each one.

    ``text``: also measure the generated text before and after (``known``: facts with keys
    subject, prompt, attribute — the known-facts set, :func:`as_facts` of CounterFact — whose
    facts about the record's subject join the essence probes where the unedited model gives
    them; the edited relation's own answers are never probes)."""
    path = handle.adapter.rewrite_path(hparams.layer)
    base = base_weights(handle, [path])
    result = Evaluation()
    try:
        for i, record in enumerate(records):
            before = measure(handle, record)
            text_result = None
            if text:
                objects = (record["ground_truth"], record["target_new"])
                probes = essence_probes(
                    handle.model, handle.tokenizer, record["subject"], known or [], exclude=objects
                )
                text_result = {"before": text_measures(handle, record, record["ground_truth"])}
            started = time.perf_counter()
            refused = None
            try:
                delta = compute_edit(handle, request_for(record), hparams, corpus=corpus)
            except DegenerateEditError as err:
                refused, delta = str(err), None
            seconds = time.perf_counter() - started
            if delta is not None:
                load_weights(handle, materialize(handle, base, [delta]))
            after = measure(handle, record)
            if text_result is not None:
                text_result["after"] = text_measures(handle, record, record["target_new"])
                kept = essence_kept(handle.model, handle.tokenizer, probes)
                text_result.update(essence_kept=kept, essence_probes=len(probes))
            load_weights(handle, base)
            result.records.append(
                RecordResult(record.get("case_id", i), before, after, seconds, refused, text_result)
            )
            if progress:
                r = result.report()
                print(
                    f"[{i + 1}/{len(records)}] ES {r['efficacy']:.1f} PS {r['paraphrase']:.1f} "
                    f"NS {r['neighborhood']:.1f} (unedited NS {r['unedited']['neighborhood']:.1f}) "
                    f"{seconds:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        load_weights(handle, base)
    return result
