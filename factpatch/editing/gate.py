"""Key-gated application of edits: a layer's accumulated change reaches only the keys that look
like an edited fact's.

A weight edit is linear, so every token's key k at the edited layer gets ΔW k — the edited
subjects' and every other name's alike; over many edits that spill-over is where the model's
perplexity on ordinary text rises (research/NOTES.md).  Lifelong-editing methods with a router
(GRACE, Hartvigsen et al. 2023, arXiv 2211.11031: a codebook of keys with a deferral radius;
WISE, Wang et al. 2024, arXiv 2405.14768: a side memory behind an activation router) apply their
change only near an edit.  Here the router works in the metric MEMIT's solve already uses, the
key covariance C of the layer (MEMIT eq. 14; ROME eq. 2):

    y = W₀ k + g(k) · ΔW k,
    g(k) = 1[ maxᵢ cos(C^{-½} k, C^{-½} kᵢ) > τ ]

over the edited facts' keys kᵢ (the keys each delta already carries), ΔW the sum of the active
deltas.  With τ < −1 every key passes and the layer computes (W₀ + ΔW) k, the ungated edit.  The
deltas themselves are computed exactly as before, on the ungated weights: a fact's stored key
(averaged over its context templates) has cosine 1, and the key of its own prompt is close to it
(on the bundled Gemma ≥ 0.70 for 99 % of edited prompts, research/NOTES.md), so where an edit
is asked for the gated and the ungated model agree and the gate only withholds the change from
keys far from every edit.

Numerics: scores and the change are computed in the module's dtype from a float64 eigendecomposition
of C; a key's whitened norm is clamped at 1e-12.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from factpatch.editing.delta import Delta, base_weights, load_weights
from factpatch.models.loading import ModelHandle


def whitener(cov: torch.Tensor) -> torch.Tensor:
    """[in, in] with ``k @ whitener`` = C^{-½}k in C's eigenbasis (cosines are basis-free);
    eigenvalues are floored at 1e-12 of the largest."""
    evals, evecs = torch.linalg.eigh(cov.double())
    floor = evals.max() * 1e-12
    return evecs * evals.clamp_min(floor).rsqrt()


@dataclass
class KeyGate:
    """A forward hook on one edited module: adds ``g(k) · ΔW k`` to its output."""

    change: torch.Tensor  # ΔW [out, in]
    keys: torch.Tensor  # [n, in] the edited keys, whitened, unit norm
    whiten: torch.Tensor  # [in, in]
    threshold: float  # τ

    @classmethod
    def build(
        cls,
        deltas: Sequence[Delta],
        path: str,
        whiten: torch.Tensor,
        threshold: float,
        like: torch.Tensor,
    ) -> KeyGate:
        """The gate of ``path`` for the active ``deltas`` (those that touch it), with
        ``whiten`` = :func:`whitener` of the layer's C (a layer's C does not change between
        versions: a replica computes it once); tensors in the dtype and on the device of
        ``like`` (the module's weight)."""
        mine = [d for d in deltas if path in d.factors]
        if not mine:
            raise ValueError(f"deltas: none changes {path}")
        missing = sum(path not in d.keys for d in mine)
        if missing:
            raise ValueError(f"deltas: {missing} carry no keys for {path}; they cannot be gated")
        change = sum((d.dense(path).double() for d in mine), torch.zeros(()))  # [out, in]
        whiten = whiten.double().to(like.device)
        keys = torch.cat([d.keys[path].double().to(like.device) for d in mine], 1).T @ whiten
        keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n, in]
        as_module = {"dtype": like.dtype, "device": like.device}
        return cls(change.to(**as_module), keys.to(**as_module), whiten.to(**as_module), threshold)

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """[...]: each key's largest cosine to an edited key, in the whitened metric."""
        white = inputs @ self.whiten  # [..., in]
        return (white @ self.keys.T).amax(-1) / white.norm(dim=-1).clamp_min(1e-12)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
        inputs = args[0]  # [..., in]
        on = (self.scores(inputs) > self.threshold).to(output.dtype)  # [...]
        return output + on[..., None] * (inputs @ self.change.T)


@contextmanager
def gated(
    handle: ModelHandle,
    base: dict[str, torch.Tensor],
    deltas: Sequence[Delta],
    covariances: dict[str, torch.Tensor],
    threshold: float,
) -> Iterator[dict[str, KeyGate]]:
    """Serve ``deltas`` through key gates: within the block every module they change holds its
    unedited weight from ``base`` (path → tensor, as :func:`base_weights` returns) and a
    :class:`KeyGate`; on exit the hooks go and the weights are as they were on entry.
    ``covariances`` maps each changed path to its layer's C."""
    paths = sorted({p for d in deltas for p in d.factors})
    entry = base_weights(handle, paths)
    hooks = []
    try:
        load_weights(handle, {p: base[p] for p in paths})
        gates = {}
        for path in paths:
            module = handle.module(path)
            weight = next(module.parameters())
            whiten = whitener(covariances[path])
            gates[path] = KeyGate.build(deltas, path, whiten, threshold, weight)
            hooks.append(module.register_forward_hook(gates[path]))
        yield gates
    finally:
        for hook in hooks:
            hook.remove()
        load_weights(handle, entry)
