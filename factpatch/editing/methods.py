"""One entry point from a method name to its delta: what a worker runs for an edit job.

=============  =====================================================  ======================
method         what one call computes                                 hyperparameters
=============  =====================================================  ======================
``rome``       one rank-one update per request, applied one after     ``RomeHParams``
               another on the fly (exact sequential ROME)
``memit``      one least-squares update for the whole batch           ``MemitHParams``
               (rank ≤ batch per layer), keeping the earlier edits'
               keys with weight ``prior_weight``
``alphaedit``  MEMIT's batch, projected onto the null space of the    ``MemitHParams``
               preserved keys and keeping the earlier edits' keys
=============  =====================================================  ======================

``overrides`` has the shape of a model's entry in ``factpatch/data/hparams.json``: ROME keys at
the top level, MEMIT/AlphaEdit keys under ``"memit"`` — e.g. ``{"layer": 3, "memit":
{"mom2_update_weight": 100}}``.  MEMIT's and AlphaEdit's memory of earlier edits comes from
``active``, the deltas the model holds (in order), through the keys each delta carries
(:meth:`SequentialState.from_deltas`); so any ledger version, rolled back or not, gives the state
that belongs to it.
"""

from __future__ import annotations

from typing import Any

from factpatch.editing.delta import Delta
from factpatch.editing.hparams import default_hparams, default_memit_hparams
from factpatch.editing.memit import compute_batch
from factpatch.editing.requests import EditRequest
from factpatch.editing.rome import compute_edit
from factpatch.models.loading import ModelHandle

METHODS = ("rome", "memit", "alphaedit")


def check_method(method: str) -> str:
    """The method name, or a ValueError naming the field the caller read it from."""
    if method not in METHODS:
        raise ValueError(f"options.method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def compute_delta(
    handle: ModelHandle,
    requests: list[EditRequest],
    method: str = "rome",
    *,
    overrides: dict[str, Any] | None = None,
    active: list[Delta] | None = None,
    base_version: int = 0,
) -> Delta:
    """The delta of ``requests`` on the model as it is now (pure: no weight is written)."""
    check_method(method)
    rome_overrides = {k: v for k, v in (overrides or {}).items() if k != "memit"}
    memit_overrides = dict((overrides or {}).get("memit", {}))
    if method == "rome":
        hp = default_hparams(handle, **rome_overrides)
        return compute_edit(handle, requests, hp, base_version=base_version)
    hp_memit = default_memit_hparams(handle, **memit_overrides)
    return compute_batch(
        handle, requests, method, hp_memit, list(active or []), base_version=base_version
    )
