"""Protected facts: prompts whose answers no edit may change, kept with the ledger.

The checked commit (factpatch/checks) scores each one on every candidate version.  Adding and
removing are audited: every change is appended to the ledger's audit stream with who and when.

Redis layout (beside the ledger's keys, same hash tag)::

    factpatch:{NAME}:protected  hash    fact id -> ProtectedFact JSON
    factpatch:{NAME}:audit      stream  {action, id, actor, time, fact JSON}, capped
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from factpatch.editing.requests import MAX_PROMPT_CHARS, MAX_TARGET_CHARS
from factpatch.ledger.ledger import Ledger, LedgerError

#: Most protected facts per ledger: every one is scored on every edit.
MAX_PROTECTED = 500
AUDIT_MAXLEN = 100_000


class UnknownProtectedError(LedgerError, KeyError):
    pass


@dataclass(frozen=True)
class ProtectedFact:
    id: str  # sha256 of prompt and answer, 16 hex digits: adding the same fact twice is a no-op
    prompt: str  # the full prompt, e.g. "The Eiffel Tower is located in the city of"
    answer: str  # the expected continuation, e.g. "Paris"
    actor: str
    created: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ProtectedFact:
        return cls(**json.loads(text))


def fact_id(prompt: str, answer: str) -> str:
    return hashlib.sha256(json.dumps([prompt, answer]).encode()).hexdigest()[:16]


class ProtectedFacts:
    def __init__(self, ledger: Ledger) -> None:
        self.redis = ledger.redis
        prefix = f"factpatch:{{{ledger.name}}}"
        self.k_facts = f"{prefix}:protected"
        self.k_audit = f"{prefix}:audit"

    def add(self, prompt: str, answer: str, actor: str = "local") -> ProtectedFact:
        """Protect ``answer`` after ``prompt`` (the same pair again returns the stored one)."""
        _check("prompt", prompt, MAX_PROMPT_CHARS)
        _check("answer", answer, MAX_TARGET_CHARS)
        fact = ProtectedFact(fact_id(prompt, answer), prompt, answer, actor, time.time())
        if self.redis.hlen(self.k_facts) >= MAX_PROTECTED and not self.redis.hexists(
            self.k_facts, fact.id
        ):
            raise ValueError(f"prompt: the ledger already protects {MAX_PROTECTED} facts")
        if self.redis.hsetnx(self.k_facts, fact.id, fact.to_json()):
            self._audit("protect", fact, actor)
            return fact
        return self.get(fact.id)

    def get(self, fact: str) -> ProtectedFact:
        text = self.redis.hget(self.k_facts, fact)
        if text is None:
            raise UnknownProtectedError(f"id: no protected fact {fact!r}")
        return ProtectedFact.from_json(text)

    def remove(self, fact: str, actor: str = "local") -> ProtectedFact:
        stored = self.get(fact)
        if self.redis.hdel(self.k_facts, fact):
            self._audit("unprotect", stored, actor)
        return stored

    def list(self) -> list[ProtectedFact]:
        facts = [ProtectedFact.from_json(t) for t in self.redis.hvals(self.k_facts)]
        return sorted(facts, key=lambda f: (f.created, f.id))

    def audit(self, count: int = 100) -> list[dict[str, Any]]:
        """The newest ``count`` audit entries, oldest first."""
        entries = self.redis.xrevrange(self.k_audit, count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries][::-1]

    def restore(self, facts: list[dict[str, Any]]) -> None:
        """Put back facts from a snapshot (factpatch/ledger/snapshot.py), as they were."""
        for data in facts:
            fact = ProtectedFact(**data)
            self.redis.hsetnx(self.k_facts, fact.id, fact.to_json())

    def _audit(self, action: str, fact: ProtectedFact, actor: str) -> None:
        entry = {
            "action": action,
            "id": fact.id,
            "actor": actor,
            "time": repr(time.time()),
            "fact": fact.to_json(),
        }
        self.redis.xadd(self.k_audit, entry, maxlen=AUDIT_MAXLEN, approximate=True)


def _check(field: str, value: Any, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{field}: is {len(value)} characters; the limit is {limit}")
