"""The one place new versions are made: edits, rollbacks and reverts.

The worker (edit jobs), the LedgerService (Rollback, RevertEdit) and ``factpatch ledger
rollback|revert`` all call a :class:`LedgerWriter`.  A version's record carries the sha256 of
every tensor it touches once materialised, so writing one needs those hashes:

* an edit or a revert makes a new list of active edits: its tensors are materialised (base +
  Σ deltas, by a :class:`Materialiser`: a replica's, which needs the model);
* a rollback makes version ``to``'s list again: its hashes are ``to``'s own, and a module that
  ``to`` does not touch is back at base, whose hash the ledger keeps (:meth:`Ledger.base_hashes`,
  recorded by the first commit that touched the module) — no model needed.

Every write is the ledger's compare-and-set on the head (:meth:`Ledger.commit`).  On a stale
head a rollback or revert re-reads the head and recomputes its list from it (never merges);
an edit commits on the ``parent`` its caller names and leaves the decision to rebase or
recompute to the caller (factpatch/worker/edit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from factpatch.editing.delta import Delta
from factpatch.ledger.ledger import Commit, Ledger, LedgerError, StaleHeadError, Version

#: How often a rollback or revert on a moving head is retried before giving up.
COMMIT_ATTEMPTS = 5


class Materialiser(Protocol):
    """What materialises an edit list (a :class:`factpatch.runtime.Replica`)."""

    def hashes_for(self, edits: Sequence[str], paths: set[str]) -> dict[str, str]:
        """sha256 of ``base + Σ deltas`` for ``paths`` and every module the edits touch."""
        ...

    def catch_up(self) -> int:
        """Serve the ledger's head (called after each commit)."""
        ...


class LedgerWriter:
    def __init__(self, ledger: Ledger, tensors: Materialiser | None = None) -> None:
        self.ledger = ledger
        self.tensors = tensors  # None: rollbacks only

    def add_edits(
        self,
        deltas: list[Delta],
        requests: list[list[dict[str, Any]]],
        computed_on: int,
        method: str = "rome",
        actor: str = "local",
        idempotency_key: str = "",
        parent: int | None = None,
        checks: dict[str, Any] | None = None,
    ) -> Commit:
        """Store deltas and commit ``parent`` + them as one version (``cause.kind == "edit"``);
        ``checks``: the candidate's check report (factpatch/checks), stored content-addressed
        and named by ``cause["checks"]``.

        The caller computed the deltas on version ``computed_on`` (recorded with each edit) and
        commits them on ``parent`` (default: the same version).  If the head is not ``parent``,
        StaleHeadError is raised: the caller recomputes, or commits again on the new head.
        """
        parent = computed_on if parent is None else parent
        for delta in deltas:  # the last line of defence before a version exists
            for path, factors in delta.factors.items():
                if not all(bool(torch.isfinite(f).all()) for f in factors):
                    raise ValueError(f"deltas: non-finite factors for {path}; not committed")
        ids = [
            self.ledger.put_edit(d, r, computed_on, method, actor).id
            for d, r in zip(deltas, requests, strict=True)
        ]
        head = self.ledger.get(parent)
        edits = list(head.edits) + ids
        cause: dict[str, Any] = {"kind": "edit", "edits": ids, "method": method}
        if checks is not None:
            cause["checks"] = self.ledger.put_report(checks)
        result = self.ledger.commit(
            parent, edits, cause, self._hashes(edits, head), actor, idempotency_key
        )
        self._served()
        return result

    def rollback(self, to: int, actor: str = "local") -> Commit:
        """A new version whose active edits equal version ``to``'s (no model needed)."""
        target = self.ledger.get(to)
        return self._commit(
            lambda head: (list(target.edits), self._rollback_hashes(target, head)),
            {"kind": "rollback", "to": to},
            actor,
        )

    def revert(self, edit_id: str, actor: str = "local") -> tuple[Commit, list[str]]:
        """A new version without ``edit_id``; also returns the later active edits that were
        computed on a model containing it (they may deserve recomputing)."""
        self.ledger.edit(edit_id)  # UnknownEditError names the field

        def without(head: Version) -> tuple[list[str], dict[str, str]]:
            if edit_id not in head.edits:
                raise ValueError(f"edit_id: {edit_id[:16]} is not active at the head")
            edits = [e for e in head.edits if e != edit_id]
            return edits, self._hashes(edits, head)

        result = self._commit(without, {"kind": "revert", "edit": edit_id}, actor)
        return result, self.ledger.tainted_by(edit_id, list(result.version.edits))

    # -- the pieces --------------------------------------------------------------------------

    def _commit(
        self,
        edits_on: Callable[[Version], tuple[list[str], dict[str, str]]],
        cause: dict[str, Any],
        actor: str,
    ) -> Commit:
        """Commit ``edits_on(head)`` (the list and its hashes) on the head; on a stale head,
        read the new head and compute again."""
        for _ in range(COMMIT_ATTEMPTS):
            head = self.ledger.get(self.ledger.head())
            edits, hashes = edits_on(head)
            try:
                result = self.ledger.commit(head.number, edits, cause, hashes, actor)
            except StaleHeadError:
                continue
            self._served()
            return result
        raise StaleHeadError(head.number, self.ledger.head())

    def _hashes(self, edits: list[str], parent: Version) -> dict[str, str]:
        """The materialised tensors' hashes of ``edits`` over the parent's modules; the base
        hash of a module touched for the first time is recorded for later rollbacks."""
        if self.tensors is None:
            raise LedgerError("materialising a new edit list needs the model (a replica)")
        # The parent's hashes already cover every module its history touched: only edits new
        # to this list can add one (one record read per new edit, not per active edit).
        earlier = set(parent.edits)
        added = [e for e in edits if e not in earlier]
        paths = set(parent.hashes) | {p for e in added for p in self.ledger.edit(e).modules}
        new = paths - set(self.ledger.base_hashes())
        if new:  # before the edit list, whose tensors the replica keeps for its next apply
            base = self.tensors.hashes_for([], new)
            self.ledger.record_base_hashes({p: base[p] for p in new})
        return self.tensors.hashes_for(edits, set(parent.hashes))

    def _rollback_hashes(self, target: Version, head: Version) -> dict[str, str]:
        """Version ``target``'s hashes, and the base hash of each module the head covers that
        ``target`` does not (back at base there)."""
        back = set(head.hashes) - set(target.hashes)
        base = self.ledger.base_hashes()
        if back - set(base):  # a ledger older than the base-hash record: materialise
            return self._hashes(list(target.edits), head)
        return {**target.hashes, **{p: base[p] for p in back}}

    def _served(self) -> None:
        if self.tensors is not None:
            self.tensors.catch_up()
