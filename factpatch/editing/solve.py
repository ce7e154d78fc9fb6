"""The solves: new key→value pairs written into W with the least change to what W does on
the keys of ordinary text, and the covariance terms they read (ROME eq. 2; MEMIT eq. 14;
AlphaEdit eq. 12).  Every solve is float64 and never forms an inverse.

    ROME:       ΔW = δ (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k̄)                                [out, in], rank 1
    MEMIT:      Δ_l = R K_lᵀ (λ·C_l + μ·K_p K_pᵀ + K_l K_lᵀ)⁻¹               rank ≤ B
    AlphaEdit:  Δ_l = R K_lᵀ P_l ((K_p K_pᵀ + K_l K_lᵀ) P_l + α I)⁻¹

Each update is returned as its factors (left [out, ·], right [in, ·], ΔW = left rightᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from factpatch.editing.covariance import CovSolver, layer_covariances
from factpatch.models.loading import ModelHandle


@dataclass
class RankOne:
    """ROME's update ΔW = left rightᵀ (float64) and how its denominator compares with k̄'s."""

    left: torch.Tensor  # δ / denominator [out]
    right: torch.Tensor  # C⁻¹k̄ [in]
    denominator_ratio: float  # (C⁻¹k̄)ᵀk / (C⁻¹k̄)ᵀk̄, k the key of the denominator


def rank_one_update(
    solver: CovSolver,
    key: torch.Tensor,
    bare_key: torch.Tensor,
    delta: torch.Tensor,
    key_mode: str = "averaged",
) -> RankOne:
    """ROME eq. 2 for the pair (k̄, v* = W k̄ + δ): ΔW k̄ = δ, and ΔW k = 0 for every k with
    (C⁻¹k̄)ᵀk = 0.  ``key_mode="averaged"`` divides by (C⁻¹k̄)ᵀk̄ (r-ROME, Gupta et al. 2024,
    arXiv 2403.07175); ``"original"`` by (C⁻¹k̄)ᵀk₀, the bare prompt's key, as the reference
    code does (when that is small the update explodes: a "disabling edit")."""
    u = solver.solve(key)  # C⁻¹k̄, float64 [in]
    den_key = key if key_mode == "averaged" else bare_key
    denominator = float(u @ den_key.double())
    ratio = denominator / float(u @ key.double())
    return RankOne(delta.double() / denominator, u, ratio)


def memit_right(
    keys: torch.Tensor,
    fitted: torch.Tensor,
    cov: torch.Tensor,
    earlier: torch.Tensor,
    mom2_weight: float,
    prior_weight: float,
) -> torch.Tensor:
    """MEMIT's right factor (λC + μ K_pK_pᵀ + F Fᵀ)⁻¹ K [in, B]: ``keys`` K [in, B], ``fitted``
    F [in, ·] (K itself, or every context's key / √T), ``earlier`` K_pK_pᵀ [in, in], λ =
    ``mom2_weight``, μ = ``prior_weight``; all float64."""
    gram = mom2_weight * cov + prior_weight * earlier + fitted @ fitted.T
    return torch.linalg.solve(gram, keys)


def alphaedit_right(
    keys: torch.Tensor,
    fitted: torch.Tensor,
    projector: torch.Tensor,
    earlier: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    """AlphaEdit's right factor P ((K_pK_pᵀ + F Fᵀ) P + α I)⁻¹ K [in, B] (Fang et al. 2025),
    which equals (P(K_pK_pᵀ + F Fᵀ) + αI)⁻¹ P K; α = ``l2``; all float64."""
    gram = earlier + fitted @ fitted.T
    eye = torch.eye(keys.shape[0], dtype=torch.float64, device=keys.device)
    return projector @ torch.linalg.solve(gram @ projector + l2 * eye, keys)


def update_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left rightᵀ‖_F for left [out, r], right [in, r], from the r×r Grams (never forms ΔW):
    ‖left rightᵀ‖² = tr((leftᵀleft)(rightᵀright))."""
    return float(((left.T @ left) * (right.T @ right)).sum().clamp(min=0).sqrt())


def covariances(
    handle: ModelHandle, layers: list[int], n_tokens: int, corpus: str | None
) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] (float64, on the model's device) for every layer, kept in the handle's
    cache; the missing ones in one pass over the text."""
    memo = {j: ("cov", j, n_tokens, corpus) for j in layers}
    missing = [j for j in layers if memo[j] not in handle.cache]
    if missing:
        for j, stats in layer_covariances(handle, missing, n_tokens, corpus).items():
            handle.cache[memo[j]] = stats.cov.to(handle.device, torch.float64)
    return {j: handle.cache[memo[j]] for j in layers}


def nullspace_projector(
    handle: ModelHandle,
    layer: int,
    cov: torch.Tensor,
    threshold: float,
    memo_key: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """AlphaEdit's P = Û Ûᵀ onto the eigenvectors of C with eigenvalue below ``threshold``
    (the null space of the preserved keys), as {"P": [in, in] float64, "dim": n}; cached in the
    handle per layer, ``memo_key`` (what C was estimated from) and threshold."""
    memo = ("nullspace", layer, *memo_key, threshold)
    if memo not in handle.cache:
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending, float64
        small = eigvecs[:, eigvals < threshold]  # [in, n]
        handle.cache[memo] = {"P": small @ small.T, "dim": int(small.shape[1])}
    return handle.cache[memo]
