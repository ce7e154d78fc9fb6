"""Any committed version on any request, from a replica that holds another (per-request
versions, for A/B comparisons and for requests that outlive a swap).

Every delta is low-rank factors, so version N's weights differ from the live version H's by
``Σ_{edits only in N} left rightᵀ − Σ_{edits only in H} left rightᵀ`` on the modules they touch.
A forward hook adds that difference to those modules' outputs, ``(x R) Lᵀ``, for the rows of a
batch that want N only, in the calling thread only (:func:`factpatch.models.hooks.thread_hooks`):
no second model, no weight written.  The result equals a replica materialised at N up to float
round-off (the materialised weights add ΔW before the matmul, the hook adds it after).

A key-gated replica serves ``W₀k + g_H(k)·ΔW_H k`` (:mod:`factpatch.editing.gate`); for rows
that want N the hook adds ``g_N(k)·ΔW_N k − g_H(k)·ΔW_H k``, the two gates built as the replica
builds them, so those rows get what a gated replica at N gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from factpatch.runtime.replica import Replica

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (left [out, r], right [in, r])


def version_diff(replica: Replica, live: int, wanted: int) -> Factors:
    """Factors that turn version ``live``'s weights into version ``wanted``'s (float32, on the
    model's device); cached per pair (versions never change)."""
    key = (live, wanted)
    cache = replica.diffs
    with replica.diffs_lock:  # the batcher and request threads share the cache
        if key not in cache:
            cache[key] = _diff(replica, live, wanted)
            while len(cache) > 64:
                cache.pop(next(iter(cache)))
        return cache[key]


def _diff(replica: Replica, live: int, wanted: int) -> Factors:
    have, want = replica.ledger.get(live).edits, replica.ledger.get(wanted).edits
    lefts: dict[str, list[torch.Tensor]] = {}
    rights: dict[str, list[torch.Tensor]] = {}
    terms = [(e, 1.0) for e in want if e not in have] + [(e, -1.0) for e in have if e not in want]
    for edit_id, sign in terms:
        for path, (left, right) in replica.delta(edit_id).factors.items():
            lefts.setdefault(path, []).append(sign * left.float())
            rights.setdefault(path, []).append(right.float())
    device = replica.handle.device
    return {
        p: (torch.cat(lefts[p], 1).to(device), torch.cat(rights[p], 1).to(device)) for p in lefts
    }


Term = Callable[[torch.Tensor], torch.Tensor]  # x [n, T, in] -> what to add [n, T, out]


def _low_rank(left: torch.Tensor, right: torch.Tensor) -> Term:
    return lambda x: (x.float() @ right) @ left.T


def _gated(old: Any, new: Any) -> Term:
    """g_new(k)·ΔW_new k − g_old(k)·ΔW_old k (either gate may be None: no change there)."""

    def change(gate: Any, x: torch.Tensor) -> torch.Tensor | float:
        if gate is None:
            return 0.0
        return (gate.scores(x) > gate.threshold).to(x.dtype)[..., None] * (x @ gate.change.T)

    return lambda x: change(new, x) - change(old, x)


def _terms(replica: Replica, live: int, wanted: int) -> dict[str, Term]:
    if replica.gate is None:
        return {p: _low_rank(*f) for p, f in version_diff(replica, live, wanted).items()}
    have, want = replica.gates_for(live), replica.gates_for(wanted)
    return {p: _gated(have.get(p), want.get(p)) for p in sorted(set(have) | set(want))}


def version_hooks(replica: Replica, live: int, rows: list[int]) -> list[tuple[Any, Any]]:
    """Forward hooks (for ``thread_hooks``) that serve row i of the next forward pass at
    version ``rows[i]`` on a replica whose live version is ``live``."""
    device = replica.handle.device
    per_path: dict[str, list[tuple[torch.Tensor, Term]]] = {}
    for version in sorted(set(rows) - {live}):
        index = torch.tensor([i for i, v in enumerate(rows) if v == version], device=device)
        for path, term in _terms(replica, live, version).items():
            per_path.setdefault(path, []).append((index, term))

    def hook(terms: list[tuple[torch.Tensor, Term]]) -> Any:
        def add(_module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]  # [rows, T, in]
            for index, term in terms:
                output = output.index_add(0, index, term(x[index]).to(output.dtype))
            return output

        return add

    return [(replica.handle.module(path), hook(terms)) for path, terms in per_path.items()]
