"""A job record, and the queue's errors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from factpatch.queue.states import JobState

#: The kinds of job; each has its own stream.
KINDS = ("edit", "trace")


class QueueError(Exception):
    """Base class of job-queue errors."""


class UnknownJobError(QueueError, KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job_id: {job_id!r} does not exist")
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class LeaseLostError(QueueError):
    """The lease no longer holds its job: the job was reclaimed by another worker (this one
    missed heartbeats), or already finished.  The holder must drop its work, writing nothing."""

    def __init__(self, job_id: str, consumer: str, state: str) -> None:
        super().__init__(f"job_id: {job_id} is no longer leased to {consumer!r} (state {state})")
        self.job_id, self.consumer, self.state = job_id, consumer, state


@dataclass(frozen=True)
class Job:
    id: str  # uuid4 hex
    kind: str  # one of KINDS
    payload: dict[str, Any]
    state: JobState
    created: float  # unix seconds
    updated: float  # unix seconds of the last change
    attempts: int = 0  # claims so far (each claim is an attempt)
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None  # {"version": 7} for an edit; the stored trace's id…
    error: str | None = None  # the last error (kept while retried); cleared on success
    idempotency_key: str = ""
    actor: str = ""
    cancel_requested: bool = False
    worker: str | None = None  # the consumer that runs (or last ran) it

    @property
    def commit_key(self) -> str:
        """The idempotency key a worker passes to ``Ledger.commit``: the client's key, else the
        job id, so a retried or reclaimed job never creates a second version."""
        return self.idempotency_key or f"job:{self.id}"

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        data = json.loads(text)
        data["state"] = JobState(data["state"])
        return cls(**data)

    # -- the Redis hash a job is stored in -----------------------------------------------------
    # Scalars as strings, dicts as JSON written by Python only: the Lua scripts never decode and
    # re-encode JSON (cjson would turn [] into {} and round floats to 14 digits).

    def to_hash(self) -> dict[str, str]:
        fields = {
            "id": self.id,
            "kind": self.kind,
            "payload": json.dumps(self.payload, sort_keys=True),
            "state": self.state.value,
            "created": repr(self.created),
            "updated": repr(self.updated),
            "attempts": str(self.attempts),
            "progress": json.dumps(self.progress, sort_keys=True),
            "idempotency_key": self.idempotency_key,
            "actor": self.actor,
            "cancel_requested": "1" if self.cancel_requested else "0",
        }
        if self.result is not None:
            fields["result"] = json.dumps(self.result, sort_keys=True)
        if self.error is not None:
            fields["error"] = self.error
        if self.worker is not None:
            fields["worker"] = self.worker
        return fields

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> Job:
        h = {as_text(k): as_text(v) for k, v in raw.items()}
        return cls(
            id=h["id"],
            kind=h["kind"],
            payload=json.loads(h["payload"]),
            state=JobState(h["state"]),
            created=float(h["created"]),
            updated=float(h["updated"]),
            attempts=int(h.get("attempts", "0")),
            progress=json.loads(h.get("progress", "{}")),
            result=json.loads(h["result"]) if "result" in h else None,
            error=h.get("error"),
            idempotency_key=h.get("idempotency_key", ""),
            actor=h.get("actor", ""),
            cancel_requested=h.get("cancel_requested") == "1",
            worker=h.get("worker"),
        )


def as_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
