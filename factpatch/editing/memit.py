"""MEMIT (Meng, Sen Sharma, Andonian, Belinkov, Bau; ICLR 2023, arXiv 2210.07229) and AlphaEdit
(Fang et al.; ICLR 2025, arXiv 2410.02355): many edits at once, spread over a range of layers.

A batch of requests i = 1..B is edited over the layers l ∈ L = (l₁ < … < l_L):

1. **Targets.**  For each request, δᵢ is optimised exactly as ROME does (same loss, same
   templates; :func:`factpatch.editing.targets.optimise_target`) at the last layer l_L, where it
   is added to the rewrite module's output.  The target for the residual stream after block l_L is
   zᵢ = hᵢ + g(vᵢ + δᵢ) − g(vᵢ), with hᵢ that block's output and vᵢ the rewrite module's output
   at the subject's last token of the bare prompt, and g what the block does to the MLP output
   before adding it to the residual stream: the identity in GPT-2/J, NeoX and Llama-like
   blocks (then zᵢ = hᵢ + δᵢ, the paper's form) and Gemma 2/3's post-feed-forward RMSNorm.
   Optimising δ in the rewrite module's own space keeps every target reachable by that module
   (an RMSNorm output has a fixed scale, so an arbitrary residual-stream δ need not be).
2. **Spreading** (MEMIT sec. 4.3, eq. 14).  For l in L in increasing order, with the updates of
   the earlier layers of this call applied: the keys K_l [in, B] (the rewrite module's input at
   the subject's last token, averaged over the context templates), the residual
   rᵢ = (zᵢ − hᵢ(now)) / (layers left, l included), mapped back through g to the rewrite
   module's output space (Rᵢ = g⁻¹(g(vᵢ) + rᵢ) − vᵢ; for the identity Rᵢ = rᵢ), and

       MEMIT:      Δ_l = R K_lᵀ (λ·C_l + μ·K_p K_pᵀ + K_l K_lᵀ)⁻¹
       AlphaEdit:  Δ_l = R K_lᵀ P_l ((K_p K_pᵀ + K_l K_lᵀ) P_l + α I)⁻¹

   with C_l = E[k kᵀ] over Wikipedia text (:mod:`factpatch.editing.covariance`),
   P_l = Û Ûᵀ the projector onto the eigenvectors of C_l whose eigenvalues are below
   ``nullspace_threshold`` (the null space of the preserved keys, so Δ_l k₀ ≈ 0 for them), and
   K_p K_pᵀ the keys of all earlier edits at that layer (:class:`SequentialState`).  Both are
   solves in float64, never explicit inverses.

   With ``key_templates`` set, the solve fits every context's key rather than only their mean
   (each weighted 1/T, so that a fact counts once): Σᵢ (1/T) Σ_t ‖Δ kᵢₜ − Rᵢ‖² =
   Σᵢ ‖Δ k̄ᵢ − Rᵢ‖² + tr(Δ S Δᵀ), S the keys' within-fact scatter, so K_l K_lᵀ in both solves
   becomes F Fᵀ = K̄ K̄ᵀ + S with F = [kᵢₜ / √T] [in, B·T] and K_l = K̄ (the mean over these
   templates); F is what the delta keeps as its keys.  It asks the update to answer alike
   whichever context precedes the subject (research/NOTES.md, "Fitting every context's key").

   μ = ``prior_weight``; μ = 0 is the paper's MEMIT.  With μ = 1 the MEMIT solve is the least-
   squares problem of MEMIT eq. 9–11 with the earlier edits counted among the memories to keep
   (each weighted as a new edit is): min ‖ΔK_p‖² + λ‖ΔK₀‖² + ‖(W + Δ)K − V‖², whose solution is
   the line above, since W already maps each k_p to its edited value.  It is the K_p term of
   AlphaEdit's objective (Fang et al. 2025, eq. 5) without the null-space projection.  For one
   earlier key, Sherman–Morrison gives the shrinkage: a later batch moves W k_p by
   1/(1 + μ·k_pᵀ(λC + KKᵀ)⁻¹k_p) of what plain MEMIT would (k_pᵀ(λC)⁻¹k_p ≈ d_key/λ: 7 at
   λ = 300 on the bundled Gemma), so later batches stop writing over earlier ones
   (research/NOTES.md).

The update of layer l is low-rank by construction: ``left = Rᵀ`` [out, B] and
``right = (λC + KKᵀ)⁻¹K`` [in, B] (AlphaEdit: ``right = P ((K_pK_pᵀ + KKᵀ)P + αI)⁻¹ K``, which
equals ``(P(K_pK_pᵀ + KKᵀ) + αI)⁻¹ P K``), so ``left @ rightᵀ = Δ_l`` with rank ≤ B.

Purity as in ROME: no weight is written.  Earlier layers' updates act through thread-private
forward hooks that add ``left (rightᵀ k)`` to the rewrite module's output
(:mod:`factpatch.models.hooks`), removed when each pass ends.

The bundled model's defaults (one layer, λ = 75, μ = 1) are in docs/evaluation.md, the
measurements behind them in research/NOTES.md; λ scales with the key width (the share of a
residual written at a typical key is s/(1+s), s ≈ d_key/λ).

Sequential editing state: K_p K_pᵀ is the only thing an edit needs from the edits before it,
so both methods take it as an explicit :class:`SequentialState` (never changed; the next one is
:meth:`SequentialState.with_delta`, which :func:`compute_alphaedit` returns with its delta);
deltas stay self-contained, each carrying its keys.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from factpatch.editing.delta import Delta
from factpatch.editing.hparams import MemitHParams, default_memit_hparams
from factpatch.editing.keys import Rows, trace
from factpatch.editing.requests import DegenerateEditError, EditRequest
from factpatch.editing.solve import (
    alphaedit_right,
    covariances,
    memit_right,
    nullspace_projector,
    update_norm,
)
from factpatch.editing.targets import (
    Target,
    mlp_contribution,
    mlp_output_for,
    optimise_target,
    upper_modules,
)
from factpatch.editing.templates import context_templates
from factpatch.models.loading import ModelHandle


@dataclass
class SequentialState:
    """What AlphaEdit carries from one batch to the next: per edited layer, the accumulated
    Σ K_p K_pᵀ (float64 [in, in]) of every earlier edit's keys, and how many edits that is.

    Keys are those of the edited facts' subjects as seen by the model right after their batch
    was applied (the reference code's order).  Every delta carries its own keys
    (:attr:`Delta.keys`), so the state of a model that holds a list of deltas is
    :meth:`from_deltas` of that list: a ledger version's state needs nothing but its deltas."""

    grams: dict[int, torch.Tensor] = field(default_factory=dict)
    n_edits: int = 0

    def gram(self, layer: int, dim: int) -> torch.Tensor:
        found = self.grams.get(layer)
        return found if found is not None else torch.zeros(dim, dim, dtype=torch.float64)

    def with_delta(self, handle: ModelHandle, delta: Delta) -> SequentialState:
        """The state once ``delta`` is applied: its keys' K Kᵀ added per layer (float64; this
        state is not changed)."""
        layer_of = {handle.adapter.rewrite_path(j): j for j in range(handle.n_layers)}
        grams = dict(self.grams)
        for path, keys in sorted(delta.keys.items()):
            K = keys.double().cpu()  # [in, n]
            layer = layer_of[path]
            grams[layer] = grams[layer] + K @ K.T if layer in grams else K @ K.T
        columns = max((k.shape[1] for k in delta.keys.values()), default=0)
        n_new = columns // int(delta.provenance.get("key_contexts", 1))
        return SequentialState(grams, self.n_edits + n_new)

    @classmethod
    def from_deltas(cls, handle: ModelHandle, deltas: list[Delta]) -> SequentialState:
        """Σ K Kᵀ per layer over the keys every delta carries (ROME, MEMIT or AlphaEdit), in
        list order, float64; ``n_edits`` counts the edited facts."""
        state = cls()
        for delta in deltas:
            state = state.with_delta(handle, delta)
        return state


def compute_memit(
    handle: ModelHandle,
    requests: EditRequest | list[EditRequest],
    hparams: MemitHParams | None = None,
    *,
    state: SequentialState | None = None,
    corpus: str | None = None,
    base_version: int = 0,
    targets: list[Target] | None = None,
) -> Delta:
    """The MEMIT delta for a batch of requests (one factor pair per edited layer, rank ≤ B);
    never changes the model.  ``state`` holds the earlier edits' keys, which the solve keeps
    with weight ``prior_weight`` (none given: no earlier edits).  ``targets``: each request's
    :func:`~factpatch.editing.targets.optimise_target` at the last layer, when the caller has
    them (else they are optimised here)."""
    state = state or SequentialState()
    return _compute(handle, requests, hparams, corpus, state, False, base_version, targets)


def compute_alphaedit(
    handle: ModelHandle,
    requests: EditRequest | list[EditRequest],
    hparams: MemitHParams | None = None,
    *,
    state: SequentialState | None = None,
    corpus: str | None = None,
    base_version: int = 0,
    targets: list[Target] | None = None,
) -> tuple[Delta, SequentialState]:
    """The AlphaEdit delta for a batch, given the earlier edits' ``state``; returns the delta
    and the state to pass with the next batch (once this delta is applied).  ``targets`` as
    for :func:`compute_memit`."""
    state = state or SequentialState()
    delta = _compute(handle, requests, hparams, corpus, state, True, base_version, targets)
    return delta, state.with_delta(handle, delta)


def compute_batch(
    handle: ModelHandle,
    requests: list[EditRequest],
    method: str,
    hparams: MemitHParams,
    earlier: list[Delta],
    *,
    corpus: str | None = None,
    base_version: int = 0,
) -> Delta:
    """``method``'s (``memit`` or ``alphaedit``) delta for a batch on a model that holds the
    deltas ``earlier`` (in order); their memory is built from their keys only when the method
    reads it (AlphaEdit, MEMIT with ``prior_weight`` > 0)."""
    if method == "memit" and hparams.prior_weight == 0:  # the paper's MEMIT needs no memory
        return compute_memit(handle, requests, hparams, corpus=corpus, base_version=base_version)
    state = SequentialState.from_deltas(handle, earlier)
    if method == "memit":
        return compute_memit(
            handle, requests, hparams, state=state, corpus=corpus, base_version=base_version
        )
    delta, _ = compute_alphaedit(
        handle, requests, hparams, state=state, corpus=corpus, base_version=base_version
    )
    return delta


# ---------------------------------------------------------------------------------------------


def _compute(
    handle: ModelHandle,
    requests: EditRequest | list[EditRequest],
    hparams: MemitHParams | None,
    corpus: str | None,
    state: SequentialState,
    alpha: bool,
    base_version: int,
    targets: list[Target] | None,
) -> Delta:
    """The shared body of MEMIT and (``alpha``) AlphaEdit."""
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ValueError("requests: at least one edit is needed")
    hp = hparams or default_memit_hparams(handle)
    layers = list(hp.layers)
    if layers[0] < 0 or layers[-1] >= handle.n_layers:
        raise ValueError(f"layers: {layers} is outside 0..{handle.n_layers - 1}")
    started = time.perf_counter()
    seconds = {"setup": 0.0, "optimise": 0.0, "keys": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    templates = context_templates(handle, [tuple(t) for t in hp.templates], hp.template_seed)
    covs = covariances(handle, layers, hp.cov_tokens, corpus)
    projectors = {}
    if alpha:
        memo = (hp.cov_tokens, corpus)
        projectors = {
            j: nullspace_projector(handle, j, covs[j], hp.nullspace_threshold, memo) for j in layers
        }
    seconds["setup"] = time.perf_counter() - t0

    # 1. Targets: δᵢ at the last layer's rewrite output (ROME's optimisation, one per request),
    # unless the caller computed them (a sweep reuses them across settings).
    t0 = time.perf_counter()
    z_hp = hp.z_hparams()
    upper = upper_modules(handle, z_hp.layer, z_hp.optimise_dtype)
    if targets is None:
        targets = [optimise_target(handle, r, z_hp, templates, None, upper) for r in requests]
    if len(targets) != len(requests):
        raise ValueError(f"targets: {len(targets)} for {len(requests)} requests")
    deltas = [target.delta for target in targets]
    z_stats = [target.stats.__dict__ for target in targets]
    seconds["optimise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = Rows.build(handle, requests, templates)
    key_templates = None
    key_rows = None
    if hp.key_templates:
        key_templates = context_templates(
            handle, [tuple(t) for t in hp.key_templates], hp.template_seed
        )
        key_rows = Rows.build(handle, requests, key_templates)
    last = layers[-1]
    first = trace(handle, rows, [last], {}, last)
    v0 = first.values[last][rows.bare]  # [B, out]
    g_last = handle.post_mlp_norm(last)
    with torch.no_grad():
        z = (
            first.hidden[rows.bare]
            + mlp_contribution(g_last, v0 + torch.stack(deltas))
            - mlp_contribution(g_last, v0)
        )
    seconds["keys"] += time.perf_counter() - t0

    # 2. Spread the residual over the layers, recomputing keys on the model edited so far.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    edited_keys: dict[str, torch.Tensor] = {}  # path -> K_l [in, B]
    prior: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layer_stats: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        now = trace(handle, rows, [layer], prior, last)
        K = rows.average(now.keys[layer]).double().T  # K_l: [in, B]
        fitted = K  # the keys the solve fits: their Gram F Fᵀ enters the preserved term
        if key_rows is not None:
            per_context = trace(handle, key_rows, [layer], prior, layer).keys[layer].double()
            K = key_rows.average(per_context).T  # K̄_l: [in, B]
            fitted = per_context.T / math.sqrt(len(key_templates))  # [in, B·T]
        with torch.no_grad():
            r = (z - now.hidden[rows.bare]) / (len(layers) - i)  # [B, d]
            v = now.values[layer][rows.bare]  # [B, out]
            resid = (mlp_output_for(handle.post_mlp_norm(layer), v, r) - v).double()  # Rᵀ: [B, out]
        seconds["keys"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        cov = covs[layer]
        earlier = state.gram(layer, K.shape[0]).to(K.device)  # K_pK_pᵀ [in, in]
        if alpha:
            P = projectors[layer]["P"]  # [in, in]
            right = alphaedit_right(K, fitted, P, earlier, hp.nullspace_l2)  # [in, B]
        else:
            right = memit_right(  # [in, B]
                K, fitted, cov, earlier, hp.mom2_update_weight, hp.prior_weight
            )
        left = resid.T  # [out, B]
        weight = handle.rewrite_weight(layer).double()
        norm = update_norm(left, right)
        ratio = norm / float(weight.norm())
        # B facts' updates add up like independent terms (‖ΔW‖_F grows as √B), so the guard reads
        # the root-mean-square share per fact; for one fact it is ROME's ‖ΔW‖/‖W‖.
        per_fact = ratio / len(requests) ** 0.5
        seconds["solve"] += time.perf_counter() - t0
        path = handle.adapter.rewrite_path(layer)
        _guard(path, hp, left, right, per_fact)
        left32, right32 = left.float(), right.float()
        factors[path] = (left32.cpu(), right32.cpu())
        # The keys at layer l depend only on the layers below it, all updated by now: they are
        # the keys the fully edited model sees.
        edited_keys[path] = fitted.float().cpu()
        prior[layer] = (left32, right32)
        layer_stats.append(
            {
                "layer": layer,
                "residual_norm": float(r.norm(dim=-1).mean()),
                "update_norm": norm,
                "update_ratio": ratio,
                "update_ratio_per_fact": per_fact,
                **({"nullspace_dim": projectors[layer]["dim"]} if alpha else {}),
            }
        )

    seconds["total"] = time.perf_counter() - started
    provenance: dict[str, Any] = {
        "method": "alphaedit" if alpha else "memit",
        "model": handle.name,
        "model_hash": handle.base_hash,
        "base_version": base_version,
        "modules": list(factors),
        "layers": layers,
        "hparams": hp.to_dict(),
        "optimise_dtype": str(upper.dtype).removeprefix("torch."),
        "requests": [r.to_dict() for r in requests],
        "stats": z_stats,
        "layer_stats": layer_stats,
        "covariance": {"n_tokens_requested": hp.cov_tokens, "corpus": corpus or "wikipedia"},
        "seconds": seconds,
    }
    if alpha or hp.prior_weight > 0:
        provenance["prior_edits"] = state.n_edits
    if key_templates is not None:
        provenance["key_contexts"] = len(key_templates)
    return Delta(factors, provenance, edited_keys)


def _guard(
    path: str, hp: MemitHParams, left: torch.Tensor, right: torch.Tensor, per_fact: float
) -> None:
    why = None
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        why = "the update has NaN or Inf entries"
    elif per_fact > hp.max_update_ratio:
        why = (
            f"‖ΔW‖/(‖W‖·√batch) = {per_fact:.3g} exceeds {hp.max_update_ratio}: "
            "it would overwrite the layer"
        )
    if why:
        raise DegenerateEditError(f"batch refused at {path}: {why}")
