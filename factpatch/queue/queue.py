"""The job queue: Redis Streams with one consumer group, job records in hashes, Lua for every
state change.

Redis layout (one hash tag per queue, so a Redis Cluster keeps a queue in one slot)::

    factpatch:{q:NAME}:job:ID          hash     the job record (Job.to_hash) + its live stream entry
    factpatch:{q:NAME}:jobs            zset     job id by created time (list, newest first)
    factpatch:{q:NAME}:active:KIND     zset     queued-or-running job ids by created (oldest_age)
    factpatch:{q:NAME}:idem            hash     idempotency key -> job id
    factpatch:{q:NAME}:stream:KIND     stream   one entry {job: ID} per queued-or-running job
    factpatch:{q:NAME}:dead            stream   dead letters {job, kind, reason, attempts, …}
    factpatch:{q:NAME}:hb:CONSUMER     string   a worker's heartbeat, expires after heartbeat_ttl
    factpatch:{q:NAME}:events          channel  the id of every job that changes

Consumer group ``workers`` on each kind's stream, created at id 0 on first use.  An entry is
acknowledged and deleted from its stream in the same script that makes its job's outcome
durable, so a stream holds exactly the entries not yet delivered plus those delivered and not
yet acknowledged (``depth`` is its length).  A job record is only ever changed by a script
that checks the move against :data:`~factpatch.queue.states.TRANSITIONS`; a lease's scripts also
check that the job is still the lease's (running, same consumer, same entry, same attempt
number), so a worker that was presumed dead and comes back cannot overwrite its successor.

Workers: ``claim`` → work, calling ``lease.progress`` and checking ``lease.cancel_requested()``
between phases → ``lease.succeed(result)`` after the result is durable (an edit passes
``job.commit_key`` to ``Ledger.commit``, so a job that is re-run after a crash between commit
and acknowledge finds its version instead of creating a second one).  A thread keeps the
worker's heartbeat key alive (``start_heartbeat``); ``claim`` reclaims the entries of consumers
whose heartbeat key has expired, never those of a live worker however long its job takes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis

from factpatch.queue.job import KINDS, Job, LeaseLostError, UnknownJobError, as_text
from factpatch.queue.states import JobState, lua_transition_table

log = logging.getLogger(__name__)

GROUP = "workers"

_PRELUDE = (
    lua_transition_table()
    + """
local function drop(stream, group, entry)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
end
"""
)

_SUBMIT = """
-- KEYS: idem, job, index, active, stream.  ARGV: idempotency key, job id, created, channel,
-- the job's hash fields (field, value, …).
if ARGV[1] ~= '' then
  local seen = redis.call('HGET', KEYS[1], ARGV[1])
  if seen then return {'dup', seen} end
end
local entry = redis.call('XADD', KEYS[5], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[2], 'entry', entry, unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return {'ok', entry}
"""

_TAKE = """
-- Start the job of a delivered entry.  KEYS: job, stream, active, dead, owner's heartbeat.
-- ARGV: entry, consumer, mode, owner, now, max_attempts, orphan_ms, channel, job id, group,
-- kind, dead-letter maxlen.  mode 'new': just read by XREADGROUP, must be pending to consumer;
-- 'dead': pending to owner whose heartbeat has expired; 'orphan': pending (to anyone) for
-- orphan_ms and never started (its reader failed between XREADGROUP and this script).
local stream, group, entry, me, mode, now = KEYS[2], ARGV[10], ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local pend = redis.call('XPENDING', stream, group, entry, entry, 1)
if #pend == 0 then return {'gone'} end
local owner, idle = pend[1][2], tonumber(pend[1][3])
if mode == 'new' then
  if owner ~= me then return {'gone'} end
else
  if owner ~= ARGV[4] then return {'gone'} end
  if mode == 'dead' and redis.call('EXISTS', KEYS[5]) == 1 then return {'alive'} end
  if mode == 'orphan' and idle < tonumber(ARGV[7]) then return {'alive'} end
end
local f = redis.call('HMGET', KEYS[1], 'state', 'entry', 'cancel_requested', 'attempts', 'worker')
local state, job_entry, cancel, worker = f[1], f[2], f[3], f[5]
if mode == 'orphan' and state == 'running' then return {'alive'} end
if mode ~= 'new' then
  redis.call('XCLAIM', stream, group, me, 0, entry, 'JUSTID')
  if mode == 'dead' and #redis.call('XPENDING', stream, group, '-', '+', 1, owner) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, owner)
  end
end
if not state or job_entry ~= entry then drop(stream, group, entry); return {'stale'} end
if TERMINAL[state] then drop(stream, group, entry); return {'skip', state} end
if cancel == '1' then
  if not allowed(state, 'cancelled') then return {'conflict', state} end
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated', now)
  redis.call('ZREM', KEYS[3], ARGV[9])
  drop(stream, group, entry)
  redis.call('PUBLISH', ARGV[8], ARGV[9])
  return {'skip', 'cancelled'}
end
local attempts = tonumber(f[4] or '0')
if attempts >= tonumber(ARGV[6]) then
  if not allowed(state, 'dead') then return {'conflict', state} end
  local reason = 'attempts: ' .. attempts .. ' of ' .. ARGV[6] .. ' used'
  if state == 'running' then
    reason = reason .. '; worker ' .. (worker or '?') .. ' stopped heartbeating during the last'
  else
    reason = reason .. ' before this delivery'
  end
  redis.call('HSET', KEYS[1], 'state', 'dead', 'error', reason, 'updated', now)
  redis.call('ZREM', KEYS[3], ARGV[9])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[12], '*', 'job', ARGV[9], 'kind', ARGV[11],
             'reason', reason, 'attempts', attempts, 'worker', worker or '', 'time', now)
  drop(stream, group, entry)
  redis.call('PUBLISH', ARGV[8], ARGV[9])
  return {'dead', reason}
end
if not allowed(state, 'running') or (mode == 'new' and state ~= 'queued') then
  return {'conflict', state}
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'error',
             'attempt ' .. attempts .. ': worker ' .. (worker or '?') .. ' stopped heartbeating')
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', me, 'updated', now)
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

_LEASED = """
local function leased(key, entry, consumer, attempt)
  local f = redis.call('HMGET', key, 'state', 'entry', 'worker', 'attempts', 'cancel_requested')
  local ok = f[1] == 'running' and f[2] == entry and f[3] == consumer and f[4] == attempt
  return ok, f[1] or 'unknown', f[5]
end
"""

_FINISH = """
-- End a lease.  KEYS: job, stream, active, dead.  ARGV: entry, consumer, attempt, action
-- (succeed | fail | cancelled), now, channel, job id, group, kind, result JSON, error,
-- retry (1|0), max_attempts, dead-letter maxlen.
local ok, state, cancel = leased(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if not ok then return {'lost', state} end
local action, now, err = ARGV[4], ARGV[5], ARGV[11]
local target
if action == 'succeed' then target = 'succeeded'
elseif action == 'cancelled' then target = 'cancelled'
elseif cancel == '1' then target = 'cancelled'
elseif ARGV[12] == '0' then target = 'failed'
elseif tonumber(ARGV[3]) < tonumber(ARGV[13]) then target = 'queued'
else target = 'dead' end
if not allowed(state, target) then return {'conflict', state} end
drop(KEYS[2], ARGV[8], ARGV[1])
if target == 'queued' then
  local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[7])
  redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'error', err, 'updated', now,
             'progress', '{}')
  redis.call('HDEL', KEYS[1], 'worker')
else
  redis.call('ZREM', KEYS[3], ARGV[7])
  if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[10]) end
  if target == 'succeeded' then
    redis.call('HDEL', KEYS[1], 'error')
  elseif target == 'dead' then
    err = 'attempts: ' .. ARGV[3] .. ' of ' .. ARGV[13] .. ' used; last error: ' .. err
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[14], '*', 'job', ARGV[7], 'kind', ARGV[9],
               'reason', err, 'attempts', ARGV[3], 'worker', ARGV[2], 'time', now)
  end
  if err ~= '' then redis.call('HSET', KEYS[1], 'error', err) end
  redis.call('HSET', KEYS[1], 'state', target, 'updated', now)
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

_PROGRESS = """
-- KEYS: job.  ARGV: entry, consumer, attempt, progress JSON, now, channel, job id.
local ok, state = leased(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if not ok then return {'lost', state} end
redis.call('HSET', KEYS[1], 'progress', ARGV[4], 'updated', ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {'ok'}
"""

_CANCEL = """
-- KEYS: job, stream, active.  ARGV: now, channel, job id, group.
local f = redis.call('HMGET', KEYS[1], 'state', 'entry', 'cancel_requested')
local state, entry = f[1], f[2]
if not state then return {'unknown'} end
if state == 'queued' and allowed(state, 'cancelled') then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel_requested', '1', 'updated', ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
  -- Not yet delivered: delete the entry now.  Delivered: its reader acks and skips it.
  if entry and #redis.call('XPENDING', KEYS[2], ARGV[4], entry, entry, 1) == 0 then
    redis.call('XDEL', KEYS[2], entry)
  end
  redis.call('PUBLISH', ARGV[2], ARGV[3])
elseif state == 'running' and f[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

_RELEASE = """
-- Put back an entry read beyond the count asked for (a new entry at the tail; the job stays
-- queued, its attempts unchanged).  KEYS: job, stream.  ARGV: entry, consumer, group, job id.
local pend = redis.call('XPENDING', KEYS[2], ARGV[3], ARGV[1], ARGV[1], 1)
if #pend == 0 or pend[1][2] ~= ARGV[2] then return 'gone' end
local f = redis.call('HMGET', KEYS[1], 'state', 'entry')
drop(KEYS[2], ARGV[3], ARGV[1])
if f[1] == 'queued' and f[2] == ARGV[1] then
  local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
  redis.call('HSET', KEYS[1], 'entry', entry)
  return 'requeued'
end
return 'dropped'
"""


def new_consumer_name(prefix: str = "worker") -> str:
    """A consumer name unique to this process: a restarted worker must not reuse its old name,
    or its old entries would look alive and never be reclaimed."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class JobQueue:
    """Edit and trace jobs in Redis Streams; see the module docstring for the layout."""

    def __init__(
        self,
        client: redis.Redis,
        name: str = "default",
        max_attempts: int = 3,
        heartbeat_ttl: float = 10.0,
        dead_letter_max: int = 10_000,
    ) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "{}: "):
            raise ValueError(f"name: {name!r} must be non-empty without braces/colons/spaces")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts: {max_attempts!r} must be an integer >= 1")
        if not heartbeat_ttl > 0:
            raise ValueError(f"heartbeat_ttl: {heartbeat_ttl!r} must be > 0 seconds")
        if not isinstance(dead_letter_max, int) or dead_letter_max < 1:
            raise ValueError(f"dead_letter_max: {dead_letter_max!r} must be an integer >= 1")
        self.redis = client
        self.name = name
        self.max_attempts = max_attempts
        self.heartbeat_ttl = float(heartbeat_ttl)
        self.dead_letter_max = dead_letter_max
        self.prefix = f"factpatch:{{q:{name}}}"
        self.k_index = f"{self.prefix}:jobs"
        self.k_idem = f"{self.prefix}:idem"
        self.k_dead = f"{self.prefix}:dead"
        self.channel = f"{self.prefix}:events"
        self._submit = client.register_script(_SUBMIT)
        self._take = client.register_script(_PRELUDE + _TAKE)
        self._finish = client.register_script(_PRELUDE + _LEASED + _FINISH)
        self._progress = client.register_script(_PRELUDE + _LEASED + _PROGRESS)
        self._cancel = client.register_script(_PRELUDE + _CANCEL)
        self._release = client.register_script(_PRELUDE + _RELEASE)
        self._groups: set[str] = set()
        self._orphan_scan_at: dict[str, float] = {}  # kind -> when to look for orphans next

    # -- keys --------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def stream_key(self, kind: str) -> str:
        return f"{self.prefix}:stream:{kind}"

    def active_key(self, kind: str) -> str:
        return f"{self.prefix}:active:{kind}"

    def heartbeat_key(self, consumer: str) -> str:
        return f"{self.prefix}:hb:{consumer}"

    # -- clients -------------------------------------------------------------------------------

    def submit(
        self, kind: str, payload: dict[str, Any], idempotency_key: str = "", actor: str = ""
    ) -> tuple[Job, bool]:
        """Queue a job; ``(job, True)``.  With an ``idempotency_key`` already used in this queue,
        nothing is queued and ``(that job, False)`` is returned, whatever its state (a key used
        for the other kind is a ValueError; the payload is not compared)."""
        _check_kind(kind, "kind")
        if not isinstance(payload, dict):
            raise ValueError(f"payload: must be a dict, got {type(payload).__name__}")
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"payload: not JSON-serialisable ({err})") from err
        if not isinstance(idempotency_key, str) or len(idempotency_key) > 256:
            raise ValueError("idempotency_key: must be a string of at most 256 characters")
        if not isinstance(actor, str):
            raise ValueError(f"actor: must be a string, got {type(actor).__name__}")
        self._ensure_group(kind)
        now = time.time()
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            payload=payload,
            state=JobState.QUEUED,
            created=now,
            updated=now,
            idempotency_key=idempotency_key,
            actor=actor,
        )
        fields = [x for pair in job.to_hash().items() for x in pair]
        status, value = self._submit(
            keys=[
                self.k_idem,
                self.job_key(job.id),
                self.k_index,
                self.active_key(kind),
                self.stream_key(kind),
            ],
            args=[idempotency_key, job.id, repr(now), self.channel, *fields],
        )
        if as_text(status) == "dup":
            existing = self.get(as_text(value))
            if existing.kind != kind:
                raise ValueError(
                    f"idempotency_key: {idempotency_key!r} was used for {existing.kind} job "
                    f"{existing.id}, not a {kind} job"
                )
            return existing, False
        return job, True

    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(self.job_key(job_id)) if isinstance(job_id, str) else {}
        if not raw:
            raise UnknownJobError(job_id)
        return Job.from_hash(raw)

    def list(
        self,
        kind: str | None = None,
        state: JobState | str | None = None,
        limit: int = 100,
        before: float | None = None,
    ) -> list[Job]:
        """Jobs newest first, optionally of one kind and/or state, created before ``before``."""
        if kind is not None:
            _check_kind(kind, "kind")
        if state is not None:
            try:
                state = JobState(state)
            except ValueError:
                raise ValueError(
                    f"state: {state!r} is not one of {[s.value for s in JobState]}"
                ) from None
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: {limit!r} must be an integer >= 1")
        top = "+inf" if before is None else f"({before!r}"
        out: list[Job] = []
        seen: set[str] = set()
        offset, page = 0, max(limit, 100)
        while len(out) < limit:
            ids = self.redis.zrevrangebyscore(self.k_index, top, "-inf", start=offset, num=page)
            if not ids:
                break
            offset += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.job_key(as_text(job_id)))
            for raw in pipe.execute():
                if not raw:
                    continue
                job = Job.from_hash(raw)
                if job.id in seen or (kind and job.kind != kind) or (state and job.state != state):
                    continue
                seen.add(job.id)
                out.append(job)
        return out[:limit]

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now (a worker never starts it).  Running: ``cancel_requested`` is
        set; the worker sees it between phases and calls ``lease.cancelled()``.  Terminal:
        returned unchanged."""
        job = self.get(job_id)
        status, *rest = self._cancel(
            keys=[self.job_key(job_id), self.stream_key(job.kind), self.active_key(job.kind)],
            args=[repr(time.time()), self.channel, job_id, GROUP],
        )
        if as_text(status) == "unknown":
            raise UnknownJobError(job_id)
        return Job.from_hash(_pairs(rest[0]))

    def watch(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> Iterator[Job]:
        """Yield the job now and after every change until it is terminal (or ``timeout``
        seconds have passed: the iteration then just ends).  Changes are announced on the
        queue's channel; the job is also re-read every ``poll`` seconds, so a lost message
        delays an update but never loses it.  Changes closer together than a read may be seen
        as one (the later state)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(self.channel)
            # Wait for the subscription to be active before the first read: no change between
            # the read and the subscription can then go unannounced.
            confirm_by = time.monotonic() + min(poll, 5.0)
            while time.monotonic() < confirm_by:
                message = pubsub.get_message(timeout=0.1)
                if message and message["type"] == "subscribe":
                    break
            last = self.get(job_id)
            yield last
            next_read = time.monotonic() + poll
            while not last.state.terminal:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return
                wait = next_read - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                message = pubsub.get_message(timeout=max(wait, 0.0))
                announced = (
                    message is not None
                    and message["type"] == "message"
                    and as_text(message["data"]) == job_id
                )
                if not announced and time.monotonic() < next_read:
                    continue
                next_read = time.monotonic() + poll
                job = self.get(job_id)
                if job != last:
                    last = job
                    yield job
        finally:
            pubsub.close()

    # -- workers -------------------------------------------------------------------------------

    def heartbeat(self, consumer: str) -> None:
        """Mark ``consumer`` alive for ``heartbeat_ttl`` seconds."""
        _check_consumer(consumer)
        self.redis.set(
            self.heartbeat_key(consumer),
            repr(time.time()),
            px=max(1, int(self.heartbeat_ttl * 1000)),
        )

    def start_heartbeat(self, consumer: str, interval: float | None = None) -> Callable[[], None]:
        """Heartbeat now and then every ``interval`` (``heartbeat_ttl / 3``) seconds from a
        daemon thread; returns the function that stops it."""
        self.heartbeat(consumer)
        every = self.heartbeat_ttl / 3 if interval is None else interval
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every):
                try:
                    self.heartbeat(consumer)
                except redis.RedisError as err:  # keep trying: the next beat may get through
                    log.warning("heartbeat of %s failed: %s", consumer, err)

        thread = threading.Thread(target=run, name=f"heartbeat-{consumer}", daemon=True)
        thread.start()

        def stopper() -> None:
            stop.set()
            thread.join()

        return stopper

    def claim(
        self, consumer: str, kinds: Iterable[str], block_ms: int = 1000, count: int = 1
    ) -> list[Lease]:
        """Up to ``count`` jobs for ``consumer`` (which this call marks alive): first those
        reclaimed from dead consumers, then new ones in the order of ``kinds``, waiting up to
        ``block_ms`` for one if there are none.  Every claim is an attempt; a job whose attempts
        are used up is dead-lettered instead, a cancelled one acknowledged and skipped, so the
        list may be empty."""
        _check_consumer(consumer)
        kinds = list(kinds) if not isinstance(kinds, str) else [kinds]
        if not kinds:
            raise ValueError("kinds: at least one kind is needed")
        for kind in kinds:
            _check_kind(kind, "kinds")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count: {count!r} must be an integer >= 1")
        self.heartbeat(consumer)
        for kind in kinds:
            self._ensure_group(kind)
        leases: list[Lease] = []
        for kind in kinds:
            if len(leases) < count:
                leases += self._reclaim(kind, consumer, count - len(leases))
        for kind in kinds:
            if len(leases) < count:
                leases += self._read(consumer, [kind], count - len(leases), None)
        if not leases and block_ms > 0:
            leases += self._read(consumer, kinds, count, block_ms)
        return leases

    # -- metrics -------------------------------------------------------------------------------

    def depth(self, kind: str) -> int:
        """Jobs of ``kind`` not yet delivered plus delivered and not acknowledged."""
        _check_kind(kind, "kind")
        return int(self.redis.xlen(self.stream_key(kind)))

    def oldest_age(self, kind: str) -> float:
        """Seconds since the oldest queued-or-running job of ``kind`` was submitted; 0 if none."""
        _check_kind(kind, "kind")
        oldest = self.redis.zrange(self.active_key(kind), 0, 0, withscores=True)
        return max(0.0, time.time() - oldest[0][1]) if oldest else 0.0

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest dead letters, newest first."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: {limit!r} must be an integer >= 1")
        out = []
        for entry, raw in self.redis.xrevrange(self.k_dead, "+", "-", count=limit):
            fields = {as_text(k): as_text(v) for k, v in raw.items()}
            out.append(
                {
                    "id": as_text(entry),
                    "job_id": fields.get("job", ""),
                    "kind": fields.get("kind", ""),
                    "reason": fields.get("reason", ""),
                    "attempts": int(fields.get("attempts", "0")),
                    "worker": fields.get("worker", ""),
                    "time": float(fields.get("time", "0")),
                }
            )
        return out

    # -- internals -----------------------------------------------------------------------------

    def _ensure_group(self, kind: str, force: bool = False) -> None:
        if kind in self._groups and not force:
            return
        try:
            self.redis.xgroup_create(self.stream_key(kind), GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._groups.add(kind)

    def _with_groups(self, kinds: list[str], call: Callable[[], Any]) -> Any:
        """``call()``, recreating the groups once if Redis lost them (a flushed database)."""
        try:
            return call()
        except redis.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            for kind in kinds:
                self._ensure_group(kind, force=True)
            return call()

    def _read(
        self, consumer: str, kinds: list[str], need: int, block_ms: int | None
    ) -> list[Lease]:
        streams = {self.stream_key(kind): ">" for kind in kinds}
        kind_of = {self.stream_key(kind): kind for kind in kinds}
        reply = self._with_groups(
            kinds,
            lambda: self.redis.xreadgroup(GROUP, consumer, streams, count=need, block=block_ms),
        )
        leases: list[Lease] = []
        for stream, entries in reply or []:
            kind = kind_of[as_text(stream)]
            for entry, fields in entries:
                entry = as_text(entry)
                job_id = _entry_job(fields)
                if len(leases) >= need:  # several streams answered one blocking read
                    self._release(
                        keys=[self.job_key(job_id), self.stream_key(kind)],
                        args=[entry, consumer, GROUP, job_id],
                    )
                    continue
                lease = self._start(kind, entry, job_id, consumer, "new", consumer)
                if lease is not None:
                    leases.append(lease)
        return leases

    def _reclaim(self, kind: str, consumer: str, need: int) -> list[Lease]:
        """Take over entries of consumers whose heartbeat has expired, and entries delivered
        but never started (their reader failed between reading and starting them)."""
        stream = self.stream_key(kind)
        summary = self._with_groups([kind], lambda: self.redis.xpending(stream, GROUP))
        if not summary["pending"]:
            return []
        leases: list[Lease] = []
        for row in summary["consumers"] or []:
            owner = as_text(row["name"])
            if owner == consumer or self.redis.exists(self.heartbeat_key(owner)):
                continue
            pending = self.redis.xpending_range(
                stream, GROUP, "-", "+", count=max(need, 10), consumername=owner
            )
            for item in pending:
                if len(leases) >= need:
                    return leases
                lease = self._start_pending(kind, item["message_id"], consumer, "dead", owner)
                if lease is not None:
                    leases.append(lease)
        if len(leases) < need and time.monotonic() >= self._orphan_scan_at.get(kind, 0.0):
            self._orphan_scan_at[kind] = time.monotonic() + self.heartbeat_ttl / 2
            leases += self._reclaim_orphans(kind, consumer, need - len(leases))
        return leases

    def _reclaim_orphans(self, kind: str, consumer: str, need: int) -> list[Lease]:
        """Entries pending for longer than the heartbeat TTL whose job never started: their
        reader (alive, or it would have been reclaimed above) failed between XREADGROUP and
        starting the job.  Running jobs' entries are left alone however long they take."""
        stream = self.stream_key(kind)
        idle_ms = max(1, int(self.heartbeat_ttl * 1000))
        items = self.redis.xpending_range(stream, GROUP, "-", "+", count=1000, idle=idle_ms)
        if not items:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            pipe.xrange(stream, item["message_id"], item["message_id"])
        job_ids = [_entry_job(found[0][1]) if found else "" for found in pipe.execute()]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.job_key(job_id), "state")
        leases: list[Lease] = []
        for item, job_id, state in zip(items, job_ids, pipe.execute(), strict=True):
            if len(leases) >= need:
                break
            if state is not None and as_text(state) == JobState.RUNNING.value:
                continue
            owner = as_text(item["consumer"])
            lease = self._start(
                kind, as_text(item["message_id"]), job_id, consumer, "orphan", owner
            )
            if lease is not None:
                leases.append(lease)
        return leases

    def _start_pending(
        self, kind: str, entry: str | bytes, consumer: str, mode: str, owner: str
    ) -> Lease | None:
        entry = as_text(entry)
        found = self.redis.xrange(self.stream_key(kind), entry, entry)
        if not found:  # acknowledged meanwhile, or deleted while pending: nothing to run
            self.redis.xack(self.stream_key(kind), GROUP, entry)
            return None
        return self._start(kind, entry, _entry_job(found[0][1]), consumer, mode, owner)

    def _start(
        self, kind: str, entry: str, job_id: str, consumer: str, mode: str, owner: str
    ) -> Lease | None:
        status, *rest = self._take(
            keys=[
                self.job_key(job_id),
                self.stream_key(kind),
                self.active_key(kind),
                self.k_dead,
                self.heartbeat_key(owner),
            ],
            args=[
                entry,
                consumer,
                mode,
                owner,
                repr(time.time()),
                self.max_attempts,
                max(1, int(self.heartbeat_ttl * 1000)),
                self.channel,
                job_id,
                GROUP,
                kind,
                self.dead_letter_max,
            ],
        )
        status = as_text(status)
        if status == "ok":
            if mode != "new":
                log.info("job %s: reclaimed by %s from %s (%s)", job_id, consumer, owner, mode)
            return Lease(self, Job.from_hash(_pairs(rest[0])), consumer, entry)
        if status == "dead":
            log.warning("job %s dead-lettered: %s", job_id, as_text(rest[0]))
        elif status == "conflict":
            log.error("job %s: entry %s delivered in state %s", job_id, entry, as_text(rest[0]))
        return None


class Lease:
    """A claimed job, held by one consumer until it succeeds, fails or is cancelled.

    Every method checks the job is still this lease's (running, same consumer, same attempt)
    and raises :class:`LeaseLostError` otherwise: the job was reclaimed from this worker after
    its heartbeat lapsed, and the worker must drop its work."""

    def __init__(self, queue: JobQueue, job: Job, consumer: str, entry: str) -> None:
        self.queue = queue
        self.job = job
        self.consumer = consumer
        self.entry = entry  # the stream entry id
        self.attempt = job.attempts  # the fencing token

    def __repr__(self) -> str:
        return f"Lease(job={self.job.id}, kind={self.job.kind}, consumer={self.consumer!r})"

    @property
    def kind(self) -> str:
        return self.job.kind

    def progress(self, progress: dict[str, Any]) -> None:
        """Replace the job's progress (e.g. ``{"phase": "covariance"}``) and announce it."""
        if not isinstance(progress, dict):
            raise ValueError(f"progress: must be a dict, got {type(progress).__name__}")
        text = _json(progress, "progress")
        status, *rest = self.queue._progress(
            keys=[self.queue.job_key(self.job.id)],
            args=[*self._fence(), text, repr(time.time()), self.queue.channel, self.job.id],
        )
        if as_text(status) != "ok":
            raise LeaseLostError(self.job.id, self.consumer, as_text(rest[0]))

    def cancel_requested(self) -> bool:
        value = self.queue.redis.hget(self.queue.job_key(self.job.id), "cancel_requested")
        return value is not None and as_text(value) == "1"

    def held(self) -> bool:
        """Whether the job is still this lease's (not reclaimed, not finished)."""
        f = self.queue.redis.hmget(
            self.queue.job_key(self.job.id), ["state", "entry", "worker", "attempts"]
        )
        return [None if v is None else as_text(v) for v in f] == [
            JobState.RUNNING.value,
            *self._fence(),
        ]

    def succeed(self, result: dict[str, Any]) -> Job:
        """Record the result (call it after the result itself is durable: the version
        committed, the trace stored) and acknowledge, in one step."""
        if not isinstance(result, dict):
            raise ValueError(f"result: must be a dict, got {type(result).__name__}")
        return self._end("succeed", result=_json(result, "result"))

    def fail(self, error: str, retry: bool = True, result: dict[str, Any] | None = None) -> Job:
        """Queued again when ``retry`` and attempts are left; else FAILED (``retry=False``) or
        DEAD (attempts used up, dead-lettered).  A job whose cancel was requested is
        CANCELLED instead of retried.  ``result``: kept with a job that ends here (e.g. the
        check report of a refused commit)."""
        if not isinstance(error, str) or not error:
            raise ValueError("error: must be a non-empty string")
        text = "" if result is None else _json(result, "result")
        return self._end("fail", result=text, error=error, retry=retry)

    def cancelled(self) -> Job:
        """The worker stopped because a cancel was requested: CANCELLED, acknowledged."""
        return self._end("cancelled")

    def _fence(self) -> list[str]:
        return [self.entry, self.consumer, str(self.attempt)]

    def _end(self, action: str, result: str = "", error: str = "", retry: bool = True) -> Job:
        q = self.queue
        status, *rest = q._finish(
            keys=[
                q.job_key(self.job.id),
                q.stream_key(self.kind),
                q.active_key(self.kind),
                q.k_dead,
            ],
            args=[
                *self._fence(),
                action,
                repr(time.time()),
                q.channel,
                self.job.id,
                GROUP,
                self.kind,
                result,
                error,
                "1" if retry else "0",
                q.max_attempts,
                q.dead_letter_max,
            ],
        )
        if as_text(status) != "ok":
            raise LeaseLostError(self.job.id, self.consumer, as_text(rest[0]))
        self.job = Job.from_hash(_pairs(rest[0]))
        return self.job


def _check_kind(kind: object, name: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{name}: {kind!r} is not one of {KINDS}")


def _check_consumer(consumer: object) -> None:
    if not isinstance(consumer, str) or not consumer or len(consumer) > 200:
        raise ValueError(f"consumer: {consumer!r} must be a non-empty string (≤ 200 characters)")


def _json(value: dict[str, Any], name: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: not JSON-serialisable ({err})") from err


def _entry_job(fields: dict[Any, Any] | None) -> str:
    """The job id of a stream entry's fields."""
    fields = fields or {}
    return as_text(fields.get(b"job", fields.get("job", "")))


def _pairs(flat: list[Any]) -> dict[str, str]:
    it = iter(flat)
    return {as_text(k): as_text(v) for k, v in zip(it, it, strict=False)}
