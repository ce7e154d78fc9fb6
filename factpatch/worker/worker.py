"""The worker loop: take a job, compute, make the result durable, then acknowledge.

Edit job: factpatch/worker/edit.py (the edit transaction: compute on a pinned version, commit
through the ledger's writer, rebase or recompute on a stale head).

Trace job (``payload = {"prompt", "subject", "answer", "kind", "samples", "window", "noise",
"render_png"}``): runs on the replica pinned to the current version (read side held), result
stored with the version it ran on.

A worker keeps its own replica following the ledger; computing never writes the weights
(``compute_edit`` is pure), so what a server's replica answers is unaffected.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from factpatch import metrics
from factpatch.checks import CommitRefused
from factpatch.checks.scoring import Checker
from factpatch.editing import DegenerateEditError
from factpatch.ledger import Ledger
from factpatch.ledger.writer import LedgerWriter
from factpatch.models.loading import ModelHandle
from factpatch.queue import JobQueue, Lease, LeaseLostError, new_consumer_name
from factpatch.runtime import Replica
from factpatch.worker.edit import run_edit

log = logging.getLogger(__name__)


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
        self.writer = LedgerWriter(ledger, self.replica)
        self.checker = Checker(self.replica.handle)  # checked commits (factpatch/checks)
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
            "edit": partial(run_edit, self),
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
        except CommitRefused as refused:  # an enforced check failed: the report is the result
            return lease.fail(str(refused), retry=False, result=refused.report).state.value
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


def _render_png(result: Any) -> bytes:
    import tempfile
    from pathlib import Path

    from factpatch.tracing.plots import plot_traces

    with tempfile.TemporaryDirectory() as tmp:
        return plot_traces([result], Path(tmp) / "trace.png").read_bytes()
