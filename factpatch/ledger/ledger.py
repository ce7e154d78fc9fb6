"""The versioned ledger of what the served model believes, stored in Redis.

Version 0 is the base model (named by the sha256 of its weights).  Every later version is an
immutable record: its parent, the ordered list of active edits, what created it, who asked,
when, and the sha256 of every weight tensor it touches once materialised.  Deltas are stored
once, content-addressed by :meth:`Delta.digest`; versions refer to them by that id.

Redis layout (one hash tag per ledger, so a Redis Cluster keeps a ledger in one slot)::

    factpatch:{NAME}:head      string   the head version number
    factpatch:{NAME}:versions  hash     number -> Version JSON
    factpatch:{NAME}:edits     hash     edit id -> EditRecord JSON
    factpatch:{NAME}:blobs     hash     edit id -> Delta safetensors bytes
    factpatch:{NAME}:idem      hash     idempotency key -> version number
    factpatch:{NAME}:base      hash     module path -> sha256 of its base (unedited) tensor
    factpatch:{NAME}:reports   hash     report id -> check report JSON (factpatch/checks)
    factpatch:{NAME}:events    channel  publishes each new head number

A commit is one Lua script: check the idempotency key, check the head equals the writer's
expected head (a stale writer is refused, never merged), check every edit's blob exists, write
the version, move the head, publish.  Versions are append-only, so numbers are never reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from factpatch.editing.delta import Delta

#: What can create a version.  (Jobs have their own states: factpatch/queue.)
CAUSES = ("base", "edit", "rollback", "revert", "import")


class LedgerError(Exception):
    """Base class of ledger errors."""


class StaleHeadError(LedgerError):
    def __init__(self, expected: int, head: int) -> None:
        super().__init__(f"stale head: expected version {expected}, the head is {head}")
        self.expected, self.head = expected, head


class LedgerMismatchError(LedgerError):
    """The ledger belongs to other base weights than the model at hand."""


class UnknownVersionError(LedgerError, KeyError):
    pass


class UnknownEditError(LedgerError, KeyError):
    pass


class CorruptBlobError(LedgerError):
    """A stored delta's content does not match its id."""


def fingerprint(base_hash: str, edits: Sequence[str]) -> str:
    """sha256 of base weights' hash + active edits in order (:attr:`Version.fingerprint`)."""
    text = json.dumps({"base": base_hash, "edits": list(edits)})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Version:
    number: int
    parent: int | None
    edits: tuple[str, ...]  # active edit ids, in the order they are added to the base
    cause: dict[str, Any]  # {"kind": one of CAUSES, ...details}
    actor: str
    created: float  # unix seconds
    hashes: dict[str, str]  # module path -> sha256 of its materialised weight (tensor_sha256)
    base_hash: str
    model: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of what the served weights are made of: the base weights' hash and the active
        edits in order (materialisation is a function of these alone).  A rollback's version
        and its target share it."""
        return fingerprint(self.base_hash, self.edits)

    @classmethod
    def from_json(cls, text: str | bytes) -> Version:
        data = json.loads(text)
        data["edits"] = tuple(data["edits"])
        return cls(**data)


@dataclass(frozen=True)
class EditRecord:
    id: str  # Delta.digest() of the stored delta
    requests: list[dict[str, Any]]  # the edit request(s) the delta implements
    computed_on: int  # the version whose weights the delta was computed against
    method: str
    actor: str
    created: float
    modules: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EditRecord:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Commit:
    version: Version
    created: bool  # False when the idempotency key had already produced this version


_COMMIT = """
-- KEYS: head, versions, edits, idem.  ARGV: expected head, version JSON, idempotency key,
-- JSON list of edit ids, events channel.
if ARGV[3] ~= '' then
  local seen = redis.call('HGET', KEYS[4], ARGV[3])
  if seen then return {'dup', seen} end
end
local head = redis.call('GET', KEYS[1])
if head ~= ARGV[1] then return {'stale', head or '-1'} end
for _, id in ipairs(cjson.decode(ARGV[4])) do
  if redis.call('HEXISTS', KEYS[3], id) == 0 then return {'missing', id} end
end
local n = tonumber(head) + 1
redis.call('HSET', KEYS[2], n, ARGV[2])
redis.call('SET', KEYS[1], n)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], ARGV[3], n) end
redis.call('PUBLISH', ARGV[5], n)
return {'ok', tostring(n)}
"""

_INIT = """
-- KEYS: head, versions.  ARGV: version-0 JSON.
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGET', KEYS[2], 0) end
redis.call('HSET', KEYS[2], 0, ARGV[1])
redis.call('SET', KEYS[1], 0)
return ARGV[1]
"""


class Ledger:
    def __init__(self, client: redis.Redis, name: str = "default") -> None:
        if not name or any(c in name for c in "{}: "):
            raise ValueError(f"ledger name: {name!r} must be non-empty without braces/colons")
        self.redis = client
        self.name = name
        prefix = f"factpatch:{{{name}}}"
        self.k_head = f"{prefix}:head"
        self.k_versions = f"{prefix}:versions"
        self.k_edits = f"{prefix}:edits"
        self.k_blobs = f"{prefix}:blobs"
        self.k_idem = f"{prefix}:idem"
        self.k_base = f"{prefix}:base"
        self.k_reports = f"{prefix}:reports"
        self.channel = f"{prefix}:events"
        self._commit = client.register_script(_COMMIT)
        self._init = client.register_script(_INIT)

    # -- version 0 ---------------------------------------------------------------------------

    def init(self, base_hash: str, model: str, actor: str = "system") -> Version:
        """Create version 0 for these base weights, or check an existing ledger matches them."""
        zero = Version(0, None, (), {"kind": "base"}, actor, time.time(), {}, base_hash, model)
        stored = Version.from_json(
            self._init(keys=[self.k_head, self.k_versions], args=[zero.to_json()])
        )
        if stored.base_hash != base_hash:
            raise LedgerMismatchError(
                f"ledger {self.name!r} belongs to base weights {stored.base_hash[:16]} "
                f"({stored.model}); this model's weights hash is {base_hash[:16]} ({model})"
            )
        return stored

    # -- reading -----------------------------------------------------------------------------

    def head(self) -> int:
        value = self.redis.get(self.k_head)
        if value is None:
            raise UnknownVersionError(f"ledger {self.name!r} has no version 0 yet (init)")
        return int(value)

    def get(self, number: int) -> Version:
        text = self.redis.hget(self.k_versions, number)
        if text is None:
            raise UnknownVersionError(f"version: {number} does not exist")
        return Version.from_json(text)

    def versions(self, start: int = 0, stop: int | None = None) -> list[Version]:
        """Versions ``start … stop`` (inclusive; ``stop`` defaults to the head)."""
        stop = self.head() if stop is None else stop
        numbers = list(range(start, stop + 1))
        texts = self.redis.hmget(self.k_versions, numbers) if numbers else []
        return [Version.from_json(t) for t in texts if t is not None]

    def edit(self, edit_id: str) -> EditRecord:
        text = self.redis.hget(self.k_edits, edit_id)
        if text is None:
            raise UnknownEditError(f"edit_id: {edit_id} does not exist")
        return EditRecord.from_json(text)

    def blob(self, edit_id: str) -> bytes:
        data = self.redis.hget(self.k_blobs, edit_id)
        if data is None:
            raise UnknownEditError(f"edit_id: no delta stored for {edit_id}")
        return data

    def delta(self, edit_id: str) -> Delta:
        """The stored delta, checked against its content address."""
        try:
            delta = Delta.from_bytes(self.blob(edit_id))
        except UnknownEditError:
            raise
        except Exception as err:  # unreadable bytes
            raise CorruptBlobError(f"delta {edit_id[:16]}: unreadable ({err})") from err
        if delta.digest() != edit_id:
            raise CorruptBlobError(f"delta {edit_id[:16]}: content does not match its id")
        return delta

    def base_hashes(self) -> dict[str, str]:
        """sha256 of each edited module's base tensor, recorded by the commits that first
        touched it (:class:`factpatch.ledger.writer.LedgerWriter`): what a rollback needs to
        hash a module that returns to base, without the model."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.k_base).items()}

    def record_base_hashes(self, hashes: dict[str, str]) -> None:
        """Keep the base tensors' hashes of these modules (first writer wins; they never
        change for a ledger, whose version 0 names the base weights)."""
        pipe = self.redis.pipeline(transaction=True)
        for path, digest in sorted(hashes.items()):
            pipe.hsetnx(self.k_base, path, digest)
        pipe.execute()

    def report(self, report_id: str) -> dict[str, Any]:
        """A stored check report (a version's ``cause["checks"]`` names it)."""
        text = self.redis.hget(self.k_reports, report_id)
        if text is None:
            raise LedgerError(f"checks: no report {report_id[:16]} stored")
        return json.loads(text)

    def put_report(self, report: dict[str, Any]) -> str:
        """Store a check report once, content-addressed (sha256 of its canonical JSON)."""
        text = json.dumps(report, sort_keys=True)
        report_id = hashlib.sha256(text.encode()).hexdigest()
        self.redis.hsetnx(self.k_reports, report_id, text)
        return report_id

    def diff(self, a: int, b: int) -> dict[str, Any]:
        """What changes from version ``a`` to version ``b``."""
        va, vb = self.get(a), self.get(b)
        modules = sorted(set(va.hashes) | set(vb.hashes))
        return {
            "from": a,
            "to": b,
            "added": [e for e in vb.edits if e not in va.edits],
            "removed": [e for e in va.edits if e not in vb.edits],
            "changed_modules": [m for m in modules if va.hashes.get(m) != vb.hashes.get(m)],
        }

    # -- writing -----------------------------------------------------------------------------

    def put_edit(
        self,
        delta: Delta,
        requests: list[dict[str, Any]],
        computed_on: int,
        method: str = "rome",
        actor: str = "local",
    ) -> EditRecord:
        """Store a delta and its request once (content-addressed); returns its record."""
        edit_id = delta.digest()
        record = EditRecord(
            edit_id, requests, computed_on, method, actor, time.time(), sorted(delta.factors)
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.k_blobs, edit_id, delta.to_bytes())
        pipe.hsetnx(self.k_edits, edit_id, record.to_json())
        pipe.execute()
        return self.edit(edit_id)

    def commit(
        self,
        expected_head: int,
        edits: list[str],
        cause: dict[str, Any],
        hashes: dict[str, str],
        actor: str = "local",
        idempotency_key: str = "",
    ) -> Commit:
        """Append a version on top of ``expected_head`` — or refuse with StaleHeadError.

        ``hashes`` must cover every module any active edit touches and every module the parent
        hashes (so a module an earlier edit touched is checked again when it returns to base).
        With an ``idempotency_key`` seen before, nothing is written and that version is returned.
        """
        if cause.get("kind") not in CAUSES:
            raise ValueError(f"cause.kind: must be one of {CAUSES}")
        parent = self.get(expected_head)
        missing = set(parent.hashes) - set(hashes)
        if missing:
            raise ValueError(f"hashes: missing modules the parent covers: {sorted(missing)}")
        version = Version(
            expected_head + 1,
            expected_head,
            tuple(edits),
            cause,
            actor,
            time.time(),
            dict(sorted(hashes.items())),
            parent.base_hash,
            parent.model,
        )
        status, value = self._commit(
            keys=[self.k_head, self.k_versions, self.k_edits, self.k_idem],
            args=[
                str(expected_head),
                version.to_json(),
                idempotency_key,
                json.dumps(list(edits)),
                self.channel,
            ],
        )
        status, value = status.decode(), value.decode()
        if status == "dup":
            return Commit(self.get(int(value)), created=False)
        if status == "stale":
            raise StaleHeadError(expected_head, int(value))
        if status == "missing":
            raise UnknownEditError(f"edits: {value} is not stored (put_edit first)")
        return Commit(version, created=True)

    def committed(self, idempotency_key: str) -> int | None:
        """The version an idempotency key produced, if any."""
        value = self.redis.hget(self.k_idem, idempotency_key)
        return None if value is None else int(value)

    def tainted_by(self, edit_id: str, edits: list[str]) -> list[str]:
        """Those of ``edits`` computed on a version whose active edits contained ``edit_id``."""
        out = []
        for other in edits:
            if other == edit_id:
                continue
            record = self.edit(other)
            if edit_id in self.get(record.computed_on).edits:
                out.append(other)
        return out
