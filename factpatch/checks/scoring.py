"""Score a candidate version before it commits: the checks of factpatch/checks/policy.py.

The candidate is the version the delta was computed on plus the delta.  Its weights are never
written: the delta's factors act as thread-private forward hooks (``W k + L (Rᵀ k)``, the same
as materialised ``(W + L Rᵀ) k`` up to float round-off) on the worker's own replica while the
worker holds its read side, so no server's weights and no other thread see them.

Two rules:

* **beat** (the job's facts): on the fact's prompt and each paraphrase, the candidate gives the
  new target a higher mean per-token log-probability than the old answer (the request's
  ``target_true``, else the computed-on version's greedy next token on the fact's prompt) —
  CounterFact's efficacy / paraphrase comparison (Meng et al. 2022, §3).
* **keep** (neighbours, earlier edits, protected facts): the answer's mean per-token
  log-probability falls by at most :data:`KEEP_TOLERANCE` (ln 2: it keeps at least half its
  probability) from the computed-on version to the candidate.
* **fluency**: the candidate's greedy continuation of each fact's prompt is not degenerate
  (:func:`factpatch.evaluation.generation.is_degenerate`) where the computed-on version's was
  not.

Scores are float32 log-softmax over the full vocabulary at the positions that predict answer
tokens (:func:`factpatch.evaluation.sequential.score_pairs`); the forward pass runs in the
model's dtype for the beat items and with bfloat16 matmuls for the keep items (:data:`KEEP_DTYPE`).
A checker keeps what it scored
per (version fingerprint, prompt, answer): the candidate's scores are the next version's
"before" scores when it commits, so a worker editing one ledger scores each item once per edit.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from factpatch import metrics
from factpatch.checks.policy import CHECKS, FactChecks
from factpatch.editing.delta import Delta, output_hook
from factpatch.editing.requests import EditRequest
from factpatch.evaluation.generation import generate, is_degenerate, special_token_ids
from factpatch.evaluation.sequential import score_pairs
from factpatch.models.hooks import thread_hooks
from factpatch.models.loading import ModelHandle

KEEP_TOLERANCE = math.log(2)
#: Earlier facts checked besides those about the job's subjects (all of those are checked):
#: a seeded sample of this many when the ledger holds more.
EARLIER_SAMPLE = 8
#: Facts whose prompt is continued for the fluency check (a seeded sample when more).
FLUENCY_FACTS = 4
FLUENCY_TOKENS = 10
CACHE_ITEMS = 100_000
ROWS_PER_PASS = 96
#: The keep items (many: protected facts, earlier edits) are scored with bfloat16 matmuls on a
#: float32 model (torch.autocast; the log-softmax stays float32): 1.6× faster on the project
#: CPU; the drops it measures are within 0.05 nat of float32 on average (none of 1,300
#: verdicts flipped, docs/checks.md "Cost").  The beat items (the job's own facts, few,
#: whose margins can be small) are scored in the model's dtype.
KEEP_DTYPE = torch.bfloat16
PUNCTUATION = ".,;:!?\"'()[]"


@dataclass
class Item:
    """One scored prompt: ``answer`` after ``prompt`` before and after the delta."""

    check: str
    rule: str  # "beat" | "keep" | "fluency"
    prompt: str
    answer: str
    before: float | None = None  # mean log-prob on the computed-on version
    after: float | None = None  # on the candidate
    rival: str | None = None  # beat: the old answer
    rival_after: float | None = None
    fact: int | None = None  # the job's fact it belongs to
    source: str | None = None  # earlier: the edit id; protected: the fact's id
    text: str | None = None  # fluency: the candidate's continuation
    why: str | None = None  # fluency: why it is degenerate
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Earlier:
    """An active edit's fact: ``(edit id, its request)``."""

    edit_id: str
    request: EditRequest


@dataclass(frozen=True)
class Protected:
    id: str
    prompt: str
    answer: str


class Checker:
    """Runs the checks for one worker (keeps the scores cache between jobs)."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.cache: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self.special = special_token_ids(handle.tokenizer)

    def run(
        self,
        delta: Delta,
        requests: Sequence[EditRequest],
        facts: Sequence[FactChecks],
        earlier: Sequence[Earlier],
        protected: Sequence[Protected],
        policy: dict[str, str],
        before: str,
        after: str,
        seed: str,
    ) -> dict[str, Any]:
        """The report of every check ``policy`` does not turn off.  ``before`` / ``after``: the
        fingerprints of the computed-on version and of the candidate; ``seed`` fixes the
        samples (the job's commit key: a retried job checks the same facts)."""
        started = time.perf_counter()
        rng = random.Random(seed)
        hooks = [
            (self.handle.module(path), output_hook(*self._factors(left, right)))
            for path, (left, right) in sorted(delta.factors.items())
        ]
        self.fp = {"before": before, "after": after}
        items: list[Item] = []
        notes: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        if policy["edit"] != "off":
            items += self._fact_items(requests, facts)
        seconds["answers"] = time.perf_counter() - started
        if policy["earlier"] != "off":
            chosen = sample_earlier(earlier, requests, rng)
            notes["earlier"] = {"active": len(earlier), "checked": len(chosen)}
            items += [
                Item("earlier", "keep", e.request.text, e.request.target, source=e.edit_id)
                for e in chosen
            ]
        if policy["protected"] != "off":
            items += [Item("protected", "keep", p.prompt, p.answer, source=p.id) for p in protected]
        self._score(items, hooks)
        seconds["score"] = time.perf_counter() - started - sum(seconds.values())
        if policy["fluency"] != "off":
            items += self._fluency(requests, hooks, rng)
        seconds["fluency"] = time.perf_counter() - started - sum(seconds.values())
        report = _report(items, policy, notes)
        for name, check in report["checks"].items():
            if "passed" in check:
                metrics.CHECKS.labels(name, "passed" if check["passed"] else "failed").inc()
        total = time.perf_counter() - started
        metrics.CHECK_SECONDS.observe(total)
        report["seconds"] = round(total, 3)
        report["phases"] = {k: round(v, 3) for k, v in seconds.items()}
        return report

    # -- the job's own facts ---------------------------------------------------------------

    def _fact_items(
        self, requests: Sequence[EditRequest], facts: Sequence[FactChecks]
    ) -> list[Item]:
        """Beat items for each fact's prompt and paraphrases, keep items for its neighbours
        (whose answer is the computed-on version's greedy next token)."""
        unknown = [r.text for r in requests if not r.target_true]  # old answer not given
        neighbours = [n for f in facts for n in f.neighbours]
        greedy = dict(zip(unknown + neighbours, self._greedy(unknown + neighbours), strict=True))
        items = []
        for i, (r, f) in enumerate(zip(requests, facts, strict=True)):
            old = r.target_true or greedy[r.text]
            if old and old.casefold() == r.target.strip().casefold():
                old = ""  # the model already says it: nothing to beat
            for prompt in (r.text, *f.paraphrases):
                items.append(Item("edit", "beat", prompt, r.target, rival=old or None, fact=i))
        for prompt in neighbours:
            answer = greedy[prompt]
            if answer:
                fact = next(i for i, f in enumerate(facts) if prompt in f.neighbours)
                items.append(Item("edit", "keep", prompt, answer, fact=fact))
        return items

    @torch.no_grad()
    def _greedy(self, prompts: list[str]) -> list[str]:
        """The computed-on version's greedy answer to each prompt: the first word of its
        greedy continuation (4 tokens), without surrounding punctuation; "" when there is none
        (a special token first, or bytes that do not decode to printable text)."""
        if not prompts:
            return []
        out = generate(self.handle.model, self.handle.tokenizer, prompts, max_new_tokens=4)
        answers = []
        for g in out:
            words = g.text.split()
            word = words[0].strip(PUNCTUATION) if words else ""
            undecodable = "\ufffd" in word or not word.isprintable()
            blank = not g.token_ids or g.token_ids[0] in self.special or undecodable
            answers.append("" if blank else word)
        return answers

    # -- scoring ---------------------------------------------------------------------------

    def _score(self, items: list[Item], hooks: list) -> None:
        """Fill ``before``/``after`` (and the rival's ``after``) of every item, then decide."""
        beat = [i for i in items if i.rule == "beat"]
        keep = [(i.prompt, i.answer) for i in items if i.rule == "keep"]
        exact = [(i.prompt, a) for i in beat for a in (i.answer, i.rival) if a]
        after = self._scores("after", "beat", exact, hooks)
        before = self._scores("before", "keep", keep, [])
        kept = self._scores("after", "keep", keep, hooks)
        for item in items:
            pair = (item.prompt, item.answer)
            if item.rule == "keep":
                item.before, item.after = before[pair], kept[pair]
                item.passed = item.after >= item.before - KEEP_TOLERANCE
            else:
                item.after = after[pair]
                if item.rival:
                    item.rival_after = after[(item.prompt, item.rival)]
                    item.passed = item.after > item.rival_after

    def _scores(
        self, which: str, rule: str, pairs: list[tuple[str, str]], hooks: list
    ) -> dict[tuple[str, str], float]:
        """Mean log-probabilities of ``pairs`` on the computed-on version (``which="before"``)
        or the candidate (``"after"``, through ``hooks``), from the cache where it has them.
        ``rule="keep"`` scores in bfloat16 (autocast) on a float32 model: see KEEP_DTYPE."""
        fp = self.fp[which]
        todo = sorted({p for p in pairs if (fp, rule, *p) not in self.cache})
        if todo:
            with thread_hooks(forward=hooks), self._precision(rule):
                values = score_pairs(self.handle, todo, rows_per_pass=ROWS_PER_PASS)
            for pair, value in zip(todo, values, strict=True):
                self._remember((fp, rule, *pair), value)
        return {p: self.cache[(fp, rule, *p)] for p in pairs}

    def _precision(self, rule: str) -> AbstractContextManager[Any]:
        device = self.handle.device.type
        dtype = next(self.handle.model.parameters()).dtype
        if rule == "keep" and dtype == torch.float32 and device in ("cpu", "cuda"):
            return torch.autocast(device, dtype=KEEP_DTYPE)
        return nullcontext()

    def _remember(self, key: tuple[str, ...], value: Any) -> None:
        self.cache[key] = value
        self.cache.move_to_end(key)
        while len(self.cache) > CACHE_ITEMS:
            self.cache.popitem(last=False)

    def _factors(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return left.float().to(self.handle.device), right.float().to(self.handle.device)

    # -- fluency -----------------------------------------------------------------------------

    def _fluency(
        self, requests: Sequence[EditRequest], hooks: list, rng: random.Random
    ) -> list[Item]:
        prompts = list(dict.fromkeys(r.text for r in requests))
        if len(prompts) > FLUENCY_FACTS:
            prompts = sorted(rng.sample(prompts, FLUENCY_FACTS), key=prompts.index)
        after = self._continue("after", prompts, hooks)
        items = []
        for prompt, (text, why) in zip(prompts, after, strict=True):
            item = Item("fluency", "fluency", prompt, "", text=text, why=why)
            if why is not None:  # degenerate: was it already, before the delta?
                item.passed = self._continue("before", [prompt], [])[0][1] is not None
            items.append(item)
        return items

    def _continue(
        self, which: str, prompts: list[str], hooks: list
    ) -> list[tuple[str, str | None]]:
        """Greedy continuations (text, why degenerate) of ``prompts``, cached per version."""
        fp = self.fp[which]
        todo = [p for p in prompts if (fp, "text", p) not in self.cache]
        if todo:
            with thread_hooks(forward=hooks):
                out = generate(
                    self.handle.model,
                    self.handle.tokenizer,
                    todo,
                    max_new_tokens=FLUENCY_TOKENS,
                )
            for g in out:
                why = is_degenerate(g.token_ids, self.special)
                self._remember((fp, "text", g.prompt), (g.text, why))
        return [self.cache[(fp, "text", p)] for p in prompts]


def sample_earlier(
    earlier: Sequence[Earlier], requests: Sequence[EditRequest], rng: random.Random
) -> list[Earlier]:
    """Every earlier fact about a subject of this job, and a seeded sample of
    :data:`EARLIER_SAMPLE` of the others (all of them when fewer)."""
    subjects = {r.subject.casefold() for r in requests}
    same = [e for e in earlier if e.request.subject.casefold() in subjects]
    others = [e for e in earlier if e.request.subject.casefold() not in subjects]
    if len(others) > EARLIER_SAMPLE:
        others = [others[i] for i in sorted(rng.sample(range(len(others)), EARLIER_SAMPLE))]
    return same + others


def _report(items: list[Item], policy: dict[str, str], notes: dict[str, Any]) -> dict[str, Any]:
    """Per check: its policy, how many items ran and failed, the failed items (every item of
    the ``edit`` and ``fluency`` checks, which are few); the outcome: ``refused`` when an
    enforced check failed, ``warned`` when another did, else ``passed``."""
    checks: dict[str, Any] = {}
    for name in CHECKS:
        if policy[name] == "off":
            checks[name] = {"policy": "off"}
            continue
        mine = [i for i in items if i.check == name]
        failed = [i for i in mine if not i.passed]
        shown = mine if name in ("edit", "fluency") else failed
        checks[name] = {
            "policy": policy[name],
            "passed": not failed,
            "run": len(mine),
            "failed": len(failed),
            "items": [i.to_dict() for i in shown],
            **notes.get(name, {}),
        }
    failing = [n for n, c in checks.items() if c.get("passed") is False]
    if any(policy[n] == "enforce" for n in failing):
        outcome = "refused"
    else:
        outcome = "warned" if failing else "passed"
    return {"outcome": outcome, "failed": failing, "tolerance": KEEP_TOLERANCE, "checks": checks}


def refusal(report: dict[str, Any]) -> str:
    """One line naming each failed enforced check and what failed in it."""
    parts = []
    for name in report["failed"]:
        check = report["checks"][name]
        if check["policy"] != "enforce":
            continue
        bad = [i for i in check["items"] if not i["passed"]]
        what = "; ".join(_describe(i) for i in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        parts.append(f"{name}: {check['failed']} of {check['run']} failed ({what}{more})")
    return "checks refused the commit: " + " | ".join(parts)


def _describe(item: dict[str, Any]) -> str:
    where = f"edits[{item['fact']}] " if "fact" in item else ""
    if item["rule"] == "beat":
        return (
            f"{where}{item['prompt']!r}: {item['answer']!r} {item['after']:.2f} does not beat "
            f"{item.get('rival')!r} {item.get('rival_after', float('nan')):.2f}"
        )
    if item["rule"] == "fluency":
        return f"{where}{item['prompt']!r} degenerates ({item.get('why')})"
    source = f" [{item['source'][:12]}]" if "source" in item else ""
    return (
        f"{where}{item['prompt']!r} → {item['answer']!r}{source}: "
        f"{item['before']:.2f} → {item['after']:.2f}"
    )
