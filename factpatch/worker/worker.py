"""The worker loop: take a job, compute, make the result durable, then acknowledge.

Edit job (``payload = {"edits": [EditRequest dicts], "method": "rome" | "memit" | "alphaedit",
"dry_run": bool}``):

1. If the ledger already holds a version for this job (key ``job.commit_key``: a previous
   attempt committed and then died before acknowledging), succeed with that version.
2. Catch up to the head and hold the replica's read side (the weights cannot change under the
   computation); compute one delta for all the job's edits (factpatch/editing/methods.py: ROME
   applied sequentially on the fly, or one MEMIT/AlphaEdit batch; rank ≤ number of edits per
   module).  AlphaEdit's memory of earlier edits is rebuilt from the keys carried by the
   deltas active at that version.
3. Commit ``head + delta`` as one version with the ledger's compare-and-set, idempotency key
   ``job.commit_key``.  A stale head (another worker committed first): if only edit versions
   (at most ``rebase_limit``) came in between, commit the same delta on the new head (recorded
   as computed on the old one); otherwise recompute on the new head.  After ``STALE_RETRIES``
   recomputations the job fails and the queue retries it.
4. ``lease.succeed({"version": n, ...})`` stores the result, then acknowledges.

Batching policy: one job is one version.  A job may carry several edits, computed together
(``rome``: exactly, as sequential ROME steps; ``memit``/``alphaedit``: one batch solve, the
method meant for large batches); separate jobs are not merged, so each client's request maps to
exactly one version it can roll back.

Trace job (``payload = {"prompt", "subject", "answer", "kind", "samples", "window", "noise",
"render_png"}``): runs on the replica pinned to the current version (read side held), result
stored with the version it ran on.

A worker keeps its own replica following the ledger; computing never writes the weights
(``compute_edit`` is pure), so what a server's replica answers is unaffected.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from factpatch import metrics
from factpatch.editing import DegenerateEditError, Delta, EditRequest, check_method, compute_delta
from factpatch.ledger import Ledger, StaleHeadError
from factpatch.models.loading import ModelHandle
from factpatch.queue import JobQueue, Lease, LeaseLostError, new_consumer_name
from factpatch.runtime import Replica

log = logging.getLogger(__name__)

STALE_RETRIES = 3


class Worker:
    def __init__(
        self,
        handle: ModelHandle,
        ledger: Ledger,
        queue: JobQueue,
        name: str | None = None,
        poll_interval: float = 1.0,
        kinds: tuple[str, ...] = ("edit", "trace"),
        hparams: dict[str, Any] | None = None,
        rebase_limit: int = 8,
    ) -> None:
        self.replica = Replica(handle, ledger)
        metrics.watch_replica(self.replica)
        self.ledger, self.queue = ledger, queue
        self.name = name or new_consumer_name()  # unique per process: a restart is a new name
        self.poll_interval = poll_interval
        self.kinds = list(kinds)
        self.stopping = threading.Event()
        self.jobs_done = 0
        self.hparams = dict(hparams or {})  # overrides of the defaults (editing/methods.py)
        self.rebase_limit = rebase_limit
        # One handler per job kind: lease in, result out (None: cancelled).
        self.handlers: dict[str, Callable[[Lease], dict[str, Any] | None]] = {
            "edit": self._edit,
            "trace": self._trace,
        }

    def run(self) -> None:
        """Serve jobs until :meth:`stop` (finishes the job in hand first)."""
        self.replica.start()
        self.replica.follow(self.poll_interval)
        stop_heartbeat = self.queue.start_heartbeat(self.name)
        log.info("worker %s ready at version %d", self.name, self.replica.version)
        try:
            while not self.stopping.is_set():
                try:
                    leases = self.queue.claim(self.name, self.kinds, block_ms=500)
                except (redis.RedisError, ConnectionError) as err:  # Redis restarting: wait, retry
                    log.warning("queue unreachable (%s); retrying", err)
                    self.stopping.wait(self.poll_interval)
                    continue
                for lease in leases:
                    self._handle_until_done(lease)
        finally:
            stop_heartbeat()
            self.replica.stop()

    def _handle_until_done(self, lease: Lease) -> None:
        """Run the job; if Redis goes away meanwhile, run it again once it is back.  Running
        again is safe: an edit that was committed is found by its commit key, not redone."""
        while not self.stopping.is_set():
            try:
                self.handle(lease)
                return
            except (redis.RedisError, ConnectionError) as err:
                log.warning("job %s: Redis unreachable (%s); retrying", lease.job.id, err)
                self.stopping.wait(self.poll_interval)

    def stop(self) -> None:
        self.stopping.set()

    def handle(self, lease: Lease) -> None:
        started = time.perf_counter()
        try:
            outcome = self._handle(lease)
        except LeaseLostError as err:  # presumed dead and reclaimed meanwhile: drop the work
            log.warning("job %s: lease lost (%s); another worker has it", lease.job.id, err)
            outcome = "lost"
        kind = lease.job.kind
        metrics.JOB_DURATION.labels(kind, outcome).observe(time.perf_counter() - started)
        if outcome == "queued":
            metrics.JOB_RETRIES.labels(kind).inc()
        elif outcome == "dead":
            metrics.DEAD_LETTERS.labels(kind).inc()

    def _handle(self, lease: Lease) -> str:
        """Run the job; returns its outcome (the job's new state)."""
        job = lease.job
        started = time.perf_counter()
        handler = self.handlers.get(job.kind)
        if handler is None:
            return lease.fail(f"kind: unknown job kind {job.kind!r}", retry=False).state.value
        try:
            result = handler(lease)
        except (ValueError, DegenerateEditError) as err:  # the request itself is bad
            return lease.fail(f"{type(err).__name__}: {err}", retry=False).state.value
        except (LeaseLostError, redis.RedisError, ConnectionError):
            raise  # lease lost: drop the work; Redis away: run the job again once it is back
        except Exception as err:  # transient or unknown: the queue retries, then dead-letters
            log.exception("job %s failed", job.id)
            return lease.fail(f"{type(err).__name__}: {err}", retry=True).state.value
        if result is None:  # cancelled
            return lease.cancelled().state.value
        result["seconds"] = round(time.perf_counter() - started, 3)
        lease.succeed(result)
        self.jobs_done += 1
        return "succeeded"

    # -- edits -------------------------------------------------------------------------------

    def _edit(self, lease: Lease) -> dict[str, Any] | None:
        job = lease.job
        done = self.ledger.committed(job.commit_key)
        if done is not None:  # committed by an earlier attempt that died before acknowledging
            version = self.ledger.get(done)
            return {"version": done, "edit_ids": list(version.cause.get("edits", []))}
        requests = [EditRequest(**r) for r in job.payload["edits"]]
        method = check_method(job.payload.get("method") or "rome")
        for _ in range(STALE_RETRIES):
            self.replica.catch_up()
            lease.progress({"phase": "computing", "fraction": 0.1})
            with self.replica.lock.read():  # pin the weights for the whole computation
                computed_on = self.replica.version
                active = [self.replica.delta(e) for e in self.ledger.get(computed_on).edits]
                delta = compute_delta(
                    self.replica.handle,
                    requests,
                    method,
                    overrides=self.hparams,
                    active=active,
                    base_version=computed_on,
                )
            _observe_phases(delta)
            if lease.cancel_requested():
                return None
            stats = delta.provenance.get("stats", [])
            summary = {
                "computed_on": computed_on,
                "update_ratio": [s.get("update_ratio") for s in stats],
                "steps": [s.get("steps") for s in stats],
            }
            if job.payload.get("dry_run"):
                return {"dry_run": True, "edit_id": delta.digest(), **summary}
            lease.progress({"phase": "committing", "fraction": 0.9})
            parent = computed_on
            while True:
                try:
                    with metrics.timed(metrics.EDIT_PHASE.labels("commit")):
                        commit = self.replica.add_edits(
                            [delta],
                            [[r.to_dict() for r in requests]],
                            computed_on,
                            method=method,
                            actor=job.actor or "anonymous",
                            idempotency_key=job.commit_key,
                            parent=parent,
                        )
                    _crash_point("after_commit")
                    break
                except StaleHeadError as stale:
                    if not self._can_rebase(computed_on, stale.head):
                        commit = None
                        break
                    log.info("job %s: rebasing from %d onto %d", job.id, parent, stale.head)
                    parent = stale.head
            if commit is None:
                log.info("job %s: head moved past %d; recomputing", job.id, computed_on)
                continue
            summary["committed_on"] = commit.version.parent
            return {
                "version": commit.version.number,
                "edit_ids": list(commit.version.cause["edits"]),
                **summary,
            }
        raise StaleHeadError(computed_on, self.ledger.head())

    def _can_rebase(self, computed_on: int, head: int) -> bool:
        """Commit a delta computed on ``computed_on`` on top of ``head`` without recomputing?

        Yes when only edit versions came in between (no rollback or revert changed what the
        delta was computed against) and at most ``rebase_limit`` of them: rank-one edits of
        other facts barely interact, and recomputing each time the head moves would serialise
        M workers into one.  ``rebase_limit = 0``: always recompute on the new head.
        """
        if head - computed_on > self.rebase_limit:
            return False
        between = self.ledger.versions(computed_on + 1, head)
        return all(v.cause.get("kind") == "edit" for v in between)

    # -- traces ------------------------------------------------------------------------------

    def _trace(self, lease: Lease) -> dict[str, Any]:
        from factpatch.tracing import trace

        p = lease.job.payload
        lease.progress({"phase": "tracing", "fraction": 0.1})
        kwargs = {k: p[k] for k in ("samples", "window", "noise") if p.get(k)}
        with self.replica.lock.read():  # the whole trace runs on one version
            version = self.replica.version
            result = trace(
                self.replica.handle,
                p["prompt"],
                p["subject"],
                answer=p.get("answer") or None,
                kind=p.get("kind") or "hidden",
                **kwargs,
            )
        out: dict[str, Any] = {"version": version, "trace": result.to_json()}
        if p.get("render_png"):
            out["png_b64"] = base64.b64encode(_render_png(result)).decode()
        return out


def _observe_phases(delta: Delta) -> None:
    """Per-phase seconds into the edit-phase histogram: ROME reports them per request, MEMIT
    and AlphaEdit per batch."""
    if delta.provenance.get("method") == "rome":
        timings = [s.get("seconds", {}) for s in delta.provenance.get("stats", [])]
    else:
        timings = [delta.provenance.get("seconds", {})]
    for seconds in timings:
        for phase in ("keys", "optimise", "solve"):
            if phase in seconds:
                metrics.EDIT_PHASE.labels(phase).observe(seconds[phase])


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests (tests/test_faults.py): with
    ``FACTPATCH_CRASH_AT=<name>`` the process dies here as if killed (no cleanup, no ack)."""
    if os.environ.get("FACTPATCH_CRASH_AT") == name:
        log.error("FACTPATCH_CRASH_AT=%s: exiting now", name)
        os._exit(137)


def _render_png(result: Any) -> bytes:
    import tempfile
    from pathlib import Path

    from factpatch.tracing.plots import plot_traces

    with tempfile.TemporaryDirectory() as tmp:
        return plot_traces([result], Path(tmp) / "trace.png").read_bytes()
