"""The edit transaction: what a worker does with one edit job.

An edit job (``payload = {"edits": [EditRequest dicts], "method": "rome" | "memit" | "alphaedit",
"dry_run": bool, "facts": [FactChecks dicts], "checks": {check: policy}}``):

1. If the ledger already holds a version for this job (key ``job.commit_key``: a previous
   attempt committed and then died before acknowledging), succeed with that version.
2. Catch up to the head and hold the replica's read side (the weights cannot change under the
   computation); compute one delta for all the job's edits (factpatch/editing/methods.py: ROME
   applied sequentially on the fly, or one MEMIT/AlphaEdit batch; rank ≤ number of edits per
   module).  AlphaEdit's memory of earlier edits is rebuilt from the keys carried by the
   deltas active at that version.
3. Check the candidate (that version + the delta, as hooks on this worker's replica, still
   under the read side; factpatch/checks).  An enforced check that fails ends the job FAILED
   with the report as its result; nothing is written to the ledger.
4. Commit ``head + delta`` as one version with the ledger's compare-and-set, idempotency key
   ``job.commit_key``, the check report stored with it.  A stale head (another worker
   committed first): if only edit versions (at most ``rebase_limit``) came in between,
   commit the same delta on the new head (recorded as computed on the old one); otherwise
   recompute on the new head.  After ``STALE_RETRIES`` recomputations the job fails and the
   queue retries it.
5. ``lease.succeed({"version": n, "checks": report, ...})`` stores the result, then
   acknowledges.

Batching policy: one job is one version.  A job may carry several edits, computed together
(``rome``: exactly, as sequential ROME steps; ``memit``/``alphaedit``: one batch solve, the
method meant for large batches); separate jobs are not merged, so each client's request maps to
exactly one version it can roll back.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from factpatch import metrics
from factpatch.checks import CommitRefused, FactChecks, parse_policy
from factpatch.checks.scoring import Earlier, Protected, refusal
from factpatch.editing import Delta, EditRequest, check_method, compute_delta
from factpatch.ledger import StaleHeadError, Version
from factpatch.ledger.ledger import fingerprint
from factpatch.ledger.protected import ProtectedFacts
from factpatch.queue import Job, Lease

if TYPE_CHECKING:
    from factpatch.worker.worker import Worker

log = logging.getLogger(__name__)

STALE_RETRIES = 3


def run_edit(worker: Worker, lease: Lease) -> dict[str, Any] | None:
    """Run one edit job (the steps in the module docstring); None: cancelled."""
    job = lease.job
    done = worker.ledger.committed(job.commit_key)
    if done is not None:  # committed by an earlier attempt that died before acknowledging
        version = worker.ledger.get(done)
        return {"version": done, "edit_ids": list(version.cause.get("edits", []))}
    requests = [EditRequest(**r) for r in job.payload["edits"]]
    facts = [
        FactChecks(tuple(f.get("paraphrases", ())), tuple(f.get("neighbours", ())))
        for f in job.payload.get("facts") or [{}] * len(requests)
    ]
    policy = parse_policy("", job.payload.get("checks") or None)
    method = check_method(job.payload.get("method") or "rome")
    for _ in range(STALE_RETRIES):
        worker.replica.catch_up()
        lease.progress({"phase": "computing", "fraction": 0.1})
        with worker.replica.lock.read():  # pin the weights for the whole computation
            computed_on = worker.replica.version
            active = [worker.replica.delta(e) for e in worker.ledger.get(computed_on).edits]
            delta = compute_delta(
                worker.replica.handle,
                requests,
                method,
                overrides=worker.hparams,
                active=active,
                base_version=computed_on,
            )
            _observe_phases(delta)
            report = None
            if set(policy.values()) != {"off"} and not lease.cancel_requested():
                lease.progress({"phase": "checking", "fraction": 0.8})
                version = worker.ledger.get(computed_on)
                report = _check(worker, job, delta, requests, facts, policy, version)
                _crash_point("after_check")
        if lease.cancel_requested():
            return None
        stats = delta.provenance.get("stats", [])
        summary = {
            "computed_on": computed_on,
            "update_ratio": [s.get("update_ratio") for s in stats],
            "steps": [s.get("steps") for s in stats],
        }
        if report is not None:
            summary["checks"] = report
        if job.payload.get("dry_run"):
            return {"dry_run": True, "edit_id": delta.digest(), **summary}
        if report is not None and report["outcome"] == "refused":
            metrics.COMMITS_REFUSED.inc()
            raise CommitRefused(refusal(report), summary)
        lease.progress({"phase": "committing", "fraction": 0.9})
        parent = computed_on
        while True:
            try:
                with metrics.timed(metrics.EDIT_PHASE.labels("commit")):
                    commit = worker.writer.add_edits(
                        [delta],
                        [[r.to_dict() for r in requests]],
                        computed_on,
                        method=method,
                        actor=job.actor or "anonymous",
                        idempotency_key=job.commit_key,
                        parent=parent,
                        checks=report,
                    )
                _crash_point("after_commit")
                break
            except StaleHeadError as stale:
                if not _can_rebase(worker, computed_on, stale.head):
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
    raise StaleHeadError(computed_on, worker.ledger.head())


def _check(
    worker: Worker,
    job: Job,
    delta: Delta,
    requests: list[EditRequest],
    facts: list[FactChecks],
    policy: dict[str, str],
    version: Version,
) -> dict[str, Any]:
    """The candidate's check report (factpatch/checks/scoring.py), against ``version``: its
    active edits' facts, the ledger's protected facts."""
    earlier = [
        Earlier(edit_id, EditRequest(**r))
        for edit_id in version.edits
        for r in worker.ledger.edit(edit_id).requests
    ]
    protected = [Protected(f.id, f.prompt, f.answer) for f in ProtectedFacts(worker.ledger).list()]
    candidate = fingerprint(version.base_hash, [*version.edits, delta.digest()])
    report = worker.checker.run(
        delta,
        requests,
        facts,
        earlier,
        protected,
        policy,
        before=version.fingerprint,
        after=candidate,
        seed=job.commit_key,
    )
    return {"computed_on": version.number, "policy": policy, **report}


def _can_rebase(worker: Worker, computed_on: int, head: int) -> bool:
    """Commit a delta computed on ``computed_on`` on top of ``head`` without recomputing?

    Yes when only edit versions came in between (no rollback or revert changed what the
    delta was computed against) and at most ``rebase_limit`` of them: rank-one edits of
    other facts barely interact, and recomputing each time the head moves would serialise
    M workers into one.  ``rebase_limit = 0``: always recompute on the new head.
    """
    if head - computed_on > worker.rebase_limit:
        return False
    between = worker.ledger.versions(computed_on + 1, head)
    return all(v.cause.get("kind") == "edit" for v in between)


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
