"""MEMIT (Meng, Sen Sharma, Andonian, Belinkov, Bau; ICLR 2023, arXiv 2210.07229) and AlphaEdit
(Fang et al.; ICLR 2025, arXiv 2410.02355): many edits at once, spread over a range of layers.

A batch of requests i = 1..B is edited over the layers l ∈ L = (l₁ < … < l_L):

1. **Targets.**  For each request, δᵢ is optimised exactly as ROME does (same loss, same
   templates; :func:`factpatch.editing.rome._optimise`) at the last layer l_L, where it is added
   to the rewrite module's output.  The target for the residual stream after block l_L is
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
   whichever context precedes the subject (docs/evaluation.md, "Fitting every context's key").

   μ = ``prior_weight``; μ = 0 is the paper's MEMIT.  With μ = 1 the MEMIT solve is the least-
   squares problem of MEMIT eq. 9–11 with the earlier edits counted among the memories to keep
   (each weighted as a new edit is): min ‖ΔK_p‖² + λ‖ΔK₀‖² + ‖(W + Δ)K − V‖², whose solution is
   the line above, since W already maps each k_p to its edited value.  It is the K_p term of
   AlphaEdit's objective (Fang et al. 2025, eq. 5) without the null-space projection.  For one
   earlier key, Sherman–Morrison gives the shrinkage: a later batch moves W k_p by
   1/(1 + μ·k_pᵀ(λC + KKᵀ)⁻¹k_p) of what plain MEMIT would (k_pᵀ(λC)⁻¹k_p ≈ d_key/λ: 7 at
   λ = 300 on the bundled Gemma), so later batches stop writing over earlier ones
   (docs/evaluation.md).

The update of layer l is low-rank by construction: ``left = Rᵀ`` [out, B] and
``right = (λC + KKᵀ)⁻¹K`` [in, B] (AlphaEdit: ``right = P ((K_pK_pᵀ + KKᵀ)P + αI)⁻¹ K``, which
equals ``(P(K_pK_pᵀ + KKᵀ) + αI)⁻¹ P K``), so ``left @ rightᵀ = Δ_l`` with rank ≤ B.

Purity as in ROME: no weight is written.  Earlier layers' updates act through thread-private
forward hooks that add ``left (rightᵀ k)`` to the rewrite module's output
(:mod:`factpatch.models.hooks`), removed when each pass ends.

On the bundled Gemma 3 270M the measured defaults edit a single layer (layer 4, λ = 75, μ = 1:
a fifth of layer 2's perplexity cost per edit, docs/evaluation.md): with two to five layers the
spread residual did not reach its target (efficacy 35–75 % against 100 % for one layer,
counterfact-train).  The post-feed-forward norm fixes the
size of each MLP's contribution to the residual stream, so an earlier layer cannot add an
arbitrary share of it, which MEMIT's spreading assumes.  λ also scales with the key width: the
fraction of the residual inserted at a typical key is s/(1+s) with s ≈ d_key/λ (Mahalanobis norm
kᵀC⁻¹k ≈ d_key), so GPT-J's λ = 15,000 at d_key = 16,384 corresponds to λ ≈ 2,000 at 2,048.

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

from factpatch.editing.covariance import layer_covariances
from factpatch.editing.delta import Delta, output_hook
from factpatch.editing.hparams import MemitHParams, default_memit_hparams
from factpatch.editing.prompts import encode, pad_batch
from factpatch.editing.requests import EditRequest
from factpatch.editing.rome import DegenerateEditError, _optimise, upper_modules
from factpatch.editing.templates import context_templates
from factpatch.models.hooks import StopForward, block_output, run_until_stop, thread_hooks
from factpatch.models.loading import ModelHandle

ROWS_PER_PASS = 64  # rows per forward pass when collecting keys (bounds memory at batch 100+)


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
) -> Delta:
    """The MEMIT delta for a batch of requests (one factor pair per edited layer, rank ≤ B);
    never changes the model.  ``state`` holds the earlier edits' keys, which the solve keeps
    with weight ``prior_weight`` (none given: no earlier edits)."""
    return _compute(
        handle, requests, hparams, corpus, state or SequentialState(), False, base_version
    )


def compute_alphaedit(
    handle: ModelHandle,
    requests: EditRequest | list[EditRequest],
    hparams: MemitHParams | None = None,
    *,
    state: SequentialState | None = None,
    corpus: str | None = None,
    base_version: int = 0,
) -> tuple[Delta, SequentialState]:
    """The AlphaEdit delta for a batch, given the earlier edits' ``state``; returns the delta
    and the state to pass with the next batch (once this delta is applied)."""
    state = state or SequentialState()
    delta = _compute(handle, requests, hparams, corpus, state, True, base_version)
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
    covs = _covariances(handle, layers, hp.cov_tokens, corpus)
    projectors = {j: _nullspace(handle, j, covs[j], hp, corpus) for j in layers} if alpha else {}
    seconds["setup"] = time.perf_counter() - t0

    # 1. Targets: δᵢ at the last layer's rewrite output (ROME's optimisation, one per request).
    t0 = time.perf_counter()
    z_hp = hp.z_hparams()
    upper = upper_modules(handle, z_hp.layer, z_hp.optimise_dtype)
    deltas, z_stats = [], []
    for request in requests:
        _, _, delta, stats = _optimise(handle, request, z_hp, templates, None, upper)
        deltas.append(delta)
        z_stats.append(stats.__dict__)
    seconds["optimise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = _Rows.build(handle, requests, templates)
    key_templates = None
    key_rows = None
    if hp.key_templates:
        key_templates = context_templates(
            handle, [tuple(t) for t in hp.key_templates], hp.template_seed
        )
        key_rows = _Rows.build(handle, requests, key_templates)
    last = layers[-1]
    first = _trace(handle, rows, [last], {}, last)
    v0 = first.values[last][rows.bare]  # [B, out]
    g_last = handle.post_mlp_norm(last)
    with torch.no_grad():
        z = first.hidden[rows.bare] + _g(g_last, v0 + torch.stack(deltas)) - _g(g_last, v0)
    seconds["keys"] += time.perf_counter() - t0

    # 2. Spread the residual over the layers, recomputing keys on the model edited so far.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    edited_keys: dict[str, torch.Tensor] = {}  # path -> K_l [in, B]
    prior: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layer_stats: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        now = _trace(handle, rows, [layer], prior, last)
        K = rows.average(now.keys[layer]).double().T  # K_l: [in, B]
        fitted = K  # the keys the solve fits: their Gram F Fᵀ enters the preserved term
        if key_rows is not None:
            per_context = _trace(handle, key_rows, [layer], prior, layer).keys[layer].double()
            K = key_rows.average(per_context).T  # K̄_l: [in, B]
            fitted = per_context.T / math.sqrt(len(key_templates))  # [in, B·T]
        with torch.no_grad():
            r = (z - now.hidden[rows.bare]) / (len(layers) - i)  # [B, d]
            v = now.values[layer][rows.bare]  # [B, out]
            resid = (_g_inverse(handle.post_mlp_norm(layer), v, r) - v).double()  # Rᵀ: [B, out]
        seconds["keys"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        cov = covs[layer]
        earlier = state.gram(layer, K.shape[0]).to(K.device)  # K_pK_pᵀ [in, in]
        if alpha:
            P = projectors[layer]["P"]  # [in, in]
            A = earlier + fitted @ fitted.T
            eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
            right = P @ torch.linalg.solve(A @ P + hp.nullspace_l2 * eye, K)  # [in, B]
        else:
            A = hp.mom2_update_weight * cov + hp.prior_weight * earlier + fitted @ fitted.T
            right = torch.linalg.solve(A, K)  # [in, B]
        left = resid.T  # [out, B]
        weight = handle.rewrite_weight(layer).double()
        # ‖left rightᵀ‖_F² = tr((leftᵀleft)(rightᵀright)), without forming the matrix.
        update_norm = float(((left.T @ left) * (right.T @ right)).sum().clamp(min=0).sqrt())
        ratio = update_norm / float(weight.norm())
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
                "update_norm": update_norm,
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


def _covariances(
    handle: ModelHandle, layers: list[int], n_tokens: int, corpus: str | None
) -> dict[int, torch.Tensor]:
    """C_l (float64, on the model's device) for every layer; missing ones in one pass."""
    memo = {j: ("cov", j, n_tokens, corpus) for j in layers}
    missing = [j for j in layers if memo[j] not in handle.cache]
    if missing:
        for j, stats in layer_covariances(handle, missing, n_tokens, corpus).items():
            handle.cache[memo[j]] = stats.cov.to(handle.device, torch.float64)
    return {j: handle.cache[memo[j]] for j in layers}


def _nullspace(
    handle: ModelHandle, layer: int, cov: torch.Tensor, hp: MemitHParams, corpus: str | None
) -> dict[str, Any]:
    """AlphaEdit's projector P = Û Ûᵀ onto the eigenvectors of C with eigenvalue below the
    threshold (cached per model, layer, statistics and threshold)."""
    memo = ("nullspace", layer, hp.cov_tokens, corpus, hp.nullspace_threshold)
    if memo not in handle.cache:
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending, float64
        small = eigvecs[:, eigvals < hp.nullspace_threshold]  # [in, n]
        handle.cache[memo] = {"P": small @ small.T, "dim": int(small.shape[1])}
    return handle.cache[memo]


def _g(norm: torch.nn.Module | None, v: torch.Tensor) -> torch.Tensor:
    return v if norm is None else norm(v)


def _g_inverse(norm: torch.nn.Module | None, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A rewrite-module output x with g(x) ≈ g(v) + r, for rows v, r [B, d].

    RMSNorm(x) = γ ⊙ x / rms(x) is invariant to the scale of x, so x = c·a with
    a = (g(v) + r) / γ reaches the wanted direction exactly (its size is the norm's to set);
    c is the scale that keeps x closest to v."""
    if norm is None:
        return v + r
    wanted = norm(v) + r
    gain = norm(torch.ones_like(v[:1]))  # γ (up to √(1+ε))
    gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
    a = wanted / gain
    c = (a * v).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True).clamp(min=1e-30)
    rms_match = v.pow(2).mean(-1, keepdim=True).sqrt() / a.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(c > 0, c, rms_match) * a


@dataclass
class _Rows:
    """Every (request, template) prompt, right-padded, with the subject's last position."""

    ids: list[list[int]]
    subject_pos: list[int]
    owner: torch.Tensor  # [rows] request index of each row
    bare: torch.Tensor  # [B] the row of each request's bare prompt (template "{}")
    n_requests: int

    @classmethod
    def build(cls, handle: ModelHandle, requests: list[EditRequest], templates: list[str]):
        ids, pos, owner, bare = [], [], [], []
        for i, request in enumerate(requests):
            for template in templates:
                enc = encode(
                    handle.tokenizer, template.replace("{}", request.prompt), request.subject
                )
                if template == "{}":
                    bare.append(len(ids))
                ids.append(enc.ids)
                pos.append(enc.subject_last)
                owner.append(i)
        return cls(ids, pos, torch.tensor(owner), torch.tensor(bare), len(requests))

    def average(self, per_row: torch.Tensor) -> torch.Tensor:
        """Mean over each request's rows: [rows, d] → [B, d]."""
        owner = self.owner.to(per_row.device)
        sums = torch.zeros(self.n_requests, per_row.shape[1], dtype=per_row.dtype)
        sums = sums.to(per_row.device).index_add_(0, owner, per_row)
        counts = torch.bincount(owner, minlength=self.n_requests).to(per_row)
        return sums / counts[:, None]


@dataclass
class _Trace:
    keys: dict[int, torch.Tensor]  # layer → [rows, in] rewrite input at the subject position
    values: dict[int, torch.Tensor]  # layer → [rows, out] rewrite output (updates included)
    hidden: torch.Tensor  # [rows, d] residual stream after block ``stop`` at the subject


@torch.no_grad()
def _trace(
    handle: ModelHandle,
    rows: _Rows,
    layers: list[int],
    prior: dict[int, tuple[torch.Tensor, torch.Tensor]],
    stop: int,
) -> _Trace:
    """Forward every row up to block ``stop`` with ``prior`` updates added on the fly; record
    the rewrite modules' inputs/outputs at ``layers`` and the residual after ``stop``."""
    device = handle.device
    blocks = handle.module(handle.adapter.blocks)
    keys: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    values: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    hidden: list[torch.Tensor] = []
    at: dict[str, torch.Tensor] = {}

    def record(layer: int):
        def hook(_module, args, output):
            keys[layer].append(args[0][at["rows"], at["pos"]].float())
            values[layer].append(output[at["rows"], at["pos"]].float())

        return hook

    def finish(_module, _args, output):
        hidden.append(block_output(output)[at["rows"], at["pos"]].float())
        raise StopForward

    forward = [
        (handle.rewrite_module(j), output_hook(left.to(device), right.to(device)))
        for j, (left, right) in sorted(prior.items())
    ]
    forward += [(handle.rewrite_module(j), record(j)) for j in layers]
    forward += [(blocks[stop], finish)]
    pad = handle.tokenizer.pad_token_id
    with thread_hooks(forward=forward):
        for first in range(0, len(rows.ids), ROWS_PER_PASS):
            chunk = rows.ids[first : first + ROWS_PER_PASS]
            at["rows"] = torch.arange(len(chunk), device=device)
            at["pos"] = torch.tensor(rows.subject_pos[first : first + ROWS_PER_PASS], device=device)
            run_until_stop(handle.model, input_ids=pad_batch(chunk, pad, device), use_cache=False)
    return _Trace(
        {j: torch.cat(keys[j]) for j in layers},
        {j: torch.cat(values[j]) for j in layers},
        torch.cat(hidden),
    )
