"""Average indirect effects over a data set of known facts (Meng et al. 2022, figure 2).

Each fact's effect matrix [tokens, layers] is split into six token classes — first subject
token, middle subject tokens, last subject token, first subsequent token, further tokens, last
token — and every token of a class is pooled across facts, as in the paper's reference
notebook.  Tokens before the subject (a begin-of-sequence token) belong to no class.  A
single-token subject counts as both first and last subject token; when the subject ends one
token before the end, that token is both first subsequent and last token (also as in the
reference).  Only facts the model knows count: its greedy continuation must start with the
expected attribute's tokens.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factpatch.editing.prompts import continuation
from factpatch.models.loading import ModelHandle
from factpatch.tracing.core import KINDS, TraceResult, trace_kinds

TOKEN_CLASSES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
LAST_SUBJECT = TOKEN_CLASSES.index("last subject token")


@dataclass(frozen=True)
class KnownFact:
    known_id: int
    subject: str
    attribute: str
    prompt: str
    relation_id: str = ""


def load_known(path: str | Path, n: int | None = None) -> list[KnownFact]:
    """The first ``n`` records of a known-facts JSON file (``known_1000.json`` layout)."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"dataset: {path} does not hold a JSON list of facts")
    facts = []
    for record in records[:n]:
        missing = {"subject", "attribute", "prompt"} - set(record)
        if missing:
            raise ValueError(f"dataset: a record of {path} lacks {', '.join(sorted(missing))}")
        facts.append(
            KnownFact(
                known_id=int(record.get("known_id", len(facts))),
                subject=record["subject"],
                attribute=record["attribute"],
                prompt=record["prompt"],
                relation_id=record.get("relation_id", ""),
            )
        )
    return facts


@torch.no_grad()
def knows(handle: ModelHandle, fact: KnownFact) -> bool:
    """Does the greedy continuation of the prompt start with the attribute's tokens?"""
    ids, n_prompt = continuation(handle.tokenizer, fact.prompt, fact.attribute)
    expected = ids[n_prompt:]
    prompt_ids = torch.tensor([ids[:n_prompt]], device=handle.device)
    out = handle.model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=len(expected),
        do_sample=False,
        pad_token_id=handle.tokenizer.pad_token_id,
    )
    return out[0, n_prompt:].tolist() == expected


def token_classes(n_tokens: int, subject: tuple[int, int]) -> list[list[int]]:
    """Token indices of each of TOKEN_CLASSES for a prompt of ``n_tokens`` tokens."""
    start, end = subject
    last = n_tokens - 1
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        [end] if end <= last else [],
        list(range(end + 1, last)),
        [last],
    ]


@dataclass(eq=False)
class AverageResult:
    """Average indirect effect per token class × layer for one kind (the paper's figure 2)."""

    kind: str
    classes: list[str]
    layers: list[int]
    matrix: torch.Tensor  # [classes, layers] mean indirect effect
    counts: list[int]  # tokens pooled per class
    n_total: int  # facts examined
    n_kept: int  # facts the model knows (the ones averaged)
    kept: list[int]  # their known_ids
    clean: float  # mean P(answer), clean
    corrupted: float  # mean P(answer), corrupted
    settings: dict[str, Any] = field(default_factory=dict)

    def peak_layer(self, token_class: str = "last subject token") -> int:
        return int(self.matrix[self.classes.index(token_class)].argmax())

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AverageResult:
        return cls(**{**data, "matrix": torch.tensor(data["matrix"], dtype=torch.float32)})

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> AverageResult:
        return cls.from_dict(json.loads(text))


def average_traces(
    results: Sequence[TraceResult], n_total: int, kept: Sequence[int] = ()
) -> AverageResult:
    """Pool the traces (all of one kind) by token class; see the module docstring."""
    if not results:
        raise ValueError("results: nothing to average (no fact was kept)")
    n_layers = results[0].matrix.shape[1]
    sums = torch.zeros(len(TOKEN_CLASSES), n_layers, dtype=torch.float64)  # [6, L]
    counts = [0] * len(TOKEN_CLASSES)
    for result in results:
        classes = token_classes(len(result.tokens), result.subject_range)
        for c, tokens in enumerate(classes):
            sums[c] += result.matrix[tokens].double().sum(0)
            counts[c] += len(tokens)
    means = sums / torch.tensor(counts, dtype=torch.float64).clamp(min=1)[:, None]
    first = results[0]
    settings = {k: v for k, v in first.settings.items() if k not in ("seconds",)}
    return AverageResult(
        kind=first.kind,
        classes=list(TOKEN_CLASSES),
        layers=list(first.layers),
        matrix=means.float(),
        counts=counts,
        n_total=n_total,
        n_kept=len(results),
        kept=list(kept),
        clean=sum(r.clean for r in results) / len(results),
        corrupted=sum(r.corrupted for r in results) / len(results),
        settings=settings,
    )


def trace_dataset(
    handle: ModelHandle,
    facts: Sequence[KnownFact],
    kinds: Sequence[str] = KINDS,
    only_known: bool = True,
    progress: Callable[[str], None] | None = None,
    max_kept: int | None = None,
    **trace_args: Any,
) -> tuple[dict[str, AverageResult] | None, dict[str, Any]]:
    """Trace every fact the model knows (every fact if ``only_known`` is False) for ``kinds``
    and average by token class; with ``max_kept``, stop once that many facts are traced (the
    first K known facts).  Returns the averages (None if no fact was kept) and a summary with
    the counts (``n_total``: the facts read) and timings."""
    began = time.perf_counter()
    traces: dict[str, list[TraceResult]] = {kind: [] for kind in kinds}
    kept: list[int] = []
    read = 0
    for i, fact in enumerate(facts):
        if max_kept is not None and len(kept) >= max_kept:
            break
        read = i + 1
        if only_known and not knows(handle, fact):
            continue
        results = trace_kinds(
            handle, fact.prompt, fact.subject, fact.attribute, kinds, **trace_args
        )
        for kind in kinds:
            traces[kind].append(results[kind])
        kept.append(fact.known_id)
        if progress:
            progress(f"[{i + 1}/{len(facts)}] kept {len(kept)}: {fact.prompt} -> {fact.attribute}")
    summary = {
        "n_total": read,
        "n_kept": len(kept),
        "only_known": only_known,
        "seconds": round(time.perf_counter() - began, 1),
    }
    if not kept:
        return None, summary
    averages = {kind: average_traces(traces[kind], read, kept) for kind in kinds}
    return averages, summary


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
