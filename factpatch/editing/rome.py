"""ROME: Rank-One Model Editing (Meng, Bau, Andonian, Belinkov; NeurIPS 2022, arXiv 2202.05262).

The MLP output projection W at one layer is read as a key→value memory.  An edit

1. takes the key k̄: the input to W at the subject's last token, averaged over the bare prompt
   and several context-template prefixes (sec. 3.1; :mod:`factpatch.editing.keys`);
2. optimises a vector δ added to W's output at that token, in every prefixed prompt, so that
   the model assigns the new target high probability (sec. 3.1, eq. 4;
   :mod:`factpatch.editing.targets`, which also holds the loss's opt-in extensions);
3. inserts the pair (k̄, v* = W k̄ + δ) with the covariance-weighted rank-one update (eq. 2;
   :mod:`factpatch.editing.solve`)

       ΔW = (v* − W k̄) (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k̄) = δ (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k̄).

``key_mode="averaged"`` uses k̄ in the denominator too (r-ROME, Gupta et al. 2024, arXiv
2403.07175).  ``key_mode="original"`` reproduces the reference code, whose denominator uses the
bare prompt's key k₀ instead; when (C⁻¹k̄)ᵀk₀ is small the update explodes ("disabling edits").
A guard refuses any update whose denominator ratio or norm is out of bounds.

Purity: nothing here writes a weight.  Several requests are edited one after another, each on
the model as changed by the ones before — exactly, without touching weights, by adding the
earlier rank-one terms ΔW·k to W's output in a thread-private hook.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from factpatch.editing.covariance import covariance_solver
from factpatch.editing.delta import Delta
from factpatch.editing.hparams import RomeHParams, default_hparams
from factpatch.editing.requests import DegenerateEditError, EditRequest
from factpatch.editing.solve import rank_one_update
from factpatch.editing.targets import EditStats, optimise_target, upper_modules
from factpatch.editing.templates import context_templates
from factpatch.models.loading import ModelHandle

__all__ = ["DegenerateEditError", "compute_edit"]


def compute_edit(
    handle: ModelHandle,
    requests: EditRequest | list[EditRequest],
    hparams: RomeHParams | None = None,
    *,
    corpus: str | None = None,
    base_version: int = 0,
    packed: bool = True,
) -> Delta:
    """The ROME delta for one or several requests (each on the model as the ones before it
    left it); never changes the model.  ``packed=False``: every optimisation pass over every
    position (the same δ up to float rounding, slower; bench/edit_speed.py compares them)."""
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ValueError("requests: at least one edit is needed")
    hp = hparams or default_hparams(handle)
    if not 0 <= hp.layer < handle.n_layers:
        raise ValueError(f"layer: {hp.layer} is outside 0..{handle.n_layers - 1}")
    started = time.perf_counter()
    path = handle.adapter.rewrite_path(hp.layer)
    weight = handle.rewrite_weight(hp.layer).float()  # W [out, in]

    t0 = time.perf_counter()
    templates = context_templates(handle, [tuple(t) for t in hp.templates], hp.template_seed)
    solver = covariance_solver(handle, hp.layer, hp.cov_tokens, corpus)
    setup_seconds = time.perf_counter() - t0

    upper = upper_modules(handle, hp.layer, hp.optimise_dtype)
    lefts: list[torch.Tensor] = []  # each [out]
    rights: list[torch.Tensor] = []  # each C⁻¹k̄ [in]
    keys: list[torch.Tensor] = []  # each k̄ [in]
    all_stats = []
    for request in requests:
        prior = (torch.stack(lefts, 1), torch.stack(rights, 1)) if lefts else None
        target = optimise_target(handle, request, hp, templates, prior, upper, packed=packed)
        stats = target.stats

        t0 = time.perf_counter()
        update = rank_one_update(solver, target.key, target.bare_key, target.delta, hp.key_mode)
        stats.denominator_ratio = update.denominator_ratio
        update_norm = float(update.left.norm() * update.right.norm())  # ‖left rightᵀ‖_F
        stats.update_ratio = update_norm / float(weight.norm())
        stats.seconds["solve"] = time.perf_counter() - t0
        _guard(request, hp, stats, update.left, update.right)
        lefts.append(update.left.float())
        rights.append(update.right.float())
        keys.append(target.key.float())
        all_stats.append(stats)

    factors = {path: (torch.stack(lefts, 1).cpu(), torch.stack(rights, 1).cpu())}
    provenance: dict[str, Any] = {
        "method": "rome",
        "model": handle.name,
        "model_hash": handle.base_hash,
        "base_version": base_version,
        "module": path,
        "layer": hp.layer,
        "hparams": hp.to_dict(),
        "optimise_dtype": str(upper.dtype).removeprefix("torch."),
        "requests": [r.to_dict() for r in requests],
        "stats": [s.__dict__ for s in all_stats],
        "covariance": {"n_tokens": solver.n_tokens, "ridge": solver.ridge},
        "seconds": {"setup": setup_seconds, "total": time.perf_counter() - started},
    }
    # The keys are inputs to the edited module, so this delta does not change them.
    return Delta(factors, provenance, keys={path: torch.stack(keys, 1).cpu()})


def _guard(
    request: EditRequest, hp: RomeHParams, stats: EditStats, left: torch.Tensor, u: torch.Tensor
) -> None:
    why = None
    if not (torch.isfinite(left).all() and torch.isfinite(u).all()):
        why = "the update has NaN or Inf entries"
    elif stats.denominator_ratio < hp.min_denominator_ratio:
        why = (
            f"the key denominator ratio is {stats.denominator_ratio:.3g} "
            f"(< {hp.min_denominator_ratio}): the update would explode (a 'disabling edit')"
        )
    elif stats.update_ratio > hp.max_update_ratio:
        why = (
            f"‖ΔW‖/‖W‖ = {stats.update_ratio:.3g} exceeds {hp.max_update_ratio}: "
            "the update would overwrite the layer"
        )
    if why:
        raise DegenerateEditError(f"edit refused for subject {request.subject!r}: {why}")
