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

from factpatch.editing import (
    DegenerateEditError,
    EditRequest,
    RomeHParams,
    base_weights,
    compute_edit,
    load_weights,
    materialize,
)
from factpatch.editing.prompts import continuation_logprobs
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
) -> Evaluation:
    """Edit each record alone on the base weights; restore them exactly after each one."""
    path = handle.adapter.rewrite_path(hparams.layer)
    base = base_weights(handle, [path])
    result = Evaluation()
    try:
        for i, record in enumerate(records):
            before = measure(handle, record)
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
            load_weights(handle, base)
            result.records.append(
                RecordResult(record.get("case_id", i), before, after, seconds, refused)
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
