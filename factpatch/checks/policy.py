"""What a checked commit checks, and what a failing check does (no model here: the server
validates requests with it, the worker runs the checks with factpatch/checks/scoring.py).

The four checks, in the order they run:

``edit``       the job's own facts: on each prompt and paraphrase the new target beats the old
               answer; each neighbour prompt keeps its answer.
``earlier``    every still-active earlier edit's prompts keep their targets (sampled when many).
``protected``  the ledger's protected facts keep their answers.
``fluency``    greedy text about each edited subject does not degenerate.

Each has a policy: ``enforce`` (a failure refuses the commit: the job fails with the report,
nothing changes), ``warn`` (commit, report kept with the version) or ``off`` (not run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from factpatch.editing.requests import MAX_PROMPT_CHARS

CHECKS = ("edit", "earlier", "protected", "fluency")
POLICIES = ("enforce", "warn", "off")
#: The default: a fact that did not take refuses the commit; the rest are reported.  Why:
#: docs/checks.md ("Defaults").
DEFAULT_POLICY = {"edit": "enforce", "earlier": "warn", "protected": "warn", "fluency": "warn"}
#: Most paraphrases or neighbours one fact may carry.
MAX_CHECK_PROMPTS = 16


def parse_policy(
    text: str, base: dict[str, str] | None = None, where: str = "checks"
) -> dict[str, str]:
    """``"warn"`` (every check), ``"protected=enforce,fluency=off"`` (those checks), or ``""``
    (no change), applied over ``base`` (default: :data:`DEFAULT_POLICY`)."""
    policy = dict(DEFAULT_POLICY if base is None else base)
    text = (text or "").strip()
    if not text:
        return policy
    if "=" not in text:
        _check_word(text, where)
        return dict.fromkeys(CHECKS, text)
    for part in text.split(","):
        name, _, word = (s.strip() for s in part.partition("="))
        if name not in CHECKS:
            raise ValueError(f"{where}: {name!r} is not a check; the checks are {CHECKS}")
        _check_word(word, where)
        policy[name] = word
    return policy


def format_policy(policy: dict[str, str]) -> str:
    return ",".join(f"{name}={policy[name]}" for name in CHECKS)


def _check_word(word: str, where: str) -> None:
    if word not in POLICIES:
        raise ValueError(f"{where}: {word!r} is not a policy; the policies are {POLICIES}")


@dataclass(frozen=True)
class FactChecks:
    """What one fact of an edit request carries for the ``edit`` check.

    ``paraphrases``: other prompts that ask for the same fact (each must contain the subject);
    the new target must beat the old answer on them too.  ``neighbours``: prompts about other
    subjects whose answer must not change.
    """

    paraphrases: tuple[str, ...] = field(default_factory=tuple)
    neighbours: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def build(cls, subject: str, paraphrases: Any, neighbours: Any, where: str) -> FactChecks:
        return cls(
            _prompts(paraphrases, f"{where}.paraphrases", subject),
            _prompts(neighbours, f"{where}.neighbours", None),
        )

    def to_dict(self) -> dict[str, list[str]]:
        return {"paraphrases": list(self.paraphrases), "neighbours": list(self.neighbours)}


def _prompts(values: Any, field: str, subject: str | None) -> tuple[str, ...]:
    values = list(values or ())
    if len(values) > MAX_CHECK_PROMPTS:
        raise ValueError(f"{field}: {len(values)} prompts; the limit is {MAX_CHECK_PROMPTS}")
    for i, text in enumerate(values):
        name = f"{field}[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}: must be a non-empty string")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name}: is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        if subject is not None and subject not in text:
            raise ValueError(f"{name}: does not contain the subject {subject!r}")
    return tuple(values)


class CommitRefused(Exception):
    """An enforced check failed: the candidate version was not committed."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report
