"""Weight deltas as low-rank factors, and the two ways to put them into a model.

A :class:`Delta` maps module paths to factors ``(left [out, r], right [in, r])`` in float32,
with ``ΔW = left @ rightᵀ`` in the maths orientation ``W: (out, in)``.  ROME gives r = 1 per
edit.  Factors are tiny (≈ (out + in)·r floats) and exact to store.

A delta may also carry ``keys``: per module, the edited facts' keys ``[in, n]`` (the module's
input at each subject's last token, averaged over the context templates, as the model sees them
once the delta is applied; for a MEMIT batch solved with ``key_templates``, each fact's T context
keys scaled by 1/√T, n = B·T, so that K Kᵀ is the Gram the solve fitted).  They change no
weight; they are what AlphaEdit and MEMIT with μ > 0 keep intact when later edits come
(:meth:`factpatch.editing.memit.SequentialState.from_deltas`), so the state of any ledger
version can be rebuilt from its active deltas alone.

* :func:`apply_delta` adds a delta to live weights in place (quick, but repeated adds and
  subtracts drift in low precision: use it for experiments, not for versioning).
* :func:`output_hook` adds ``ΔW k`` to a module's output on the fly (a forward hook for
  :func:`factpatch.models.hooks.thread_hooks`): the update acts, no weight is written.
* :func:`materialize` computes ``base + Σ deltas`` from a copy of the base tensors, in one fixed
  order, accumulated in float32 and cast once to the model's dtype.  The same base and the same
  list of deltas always give bit-identical tensors; this is what versions and rollbacks use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save, save_file

from factpatch.models.loading import ModelHandle


@dataclass
class Delta:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    provenance: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> [in, n], float32

    def dense(self, path: str) -> torch.Tensor:
        """ΔW for ``path`` as an (out, in) float32 matrix."""
        left, right = self.factors[path]
        return left @ right.T

    def rank(self, path: str) -> int:
        return int(torch.linalg.matrix_rank(self.dense(path)))  # float32 tolerance

    def to_bytes(self) -> bytes:
        """One safetensors blob: factors ``{i}.left/right`` (and ``{i}.keys``) plus modules and
        provenance as metadata.  (Header key order may vary between calls: name a delta by
        :meth:`digest`.)"""
        tensors, modules = self._tensors()
        meta = {"modules": json.dumps(modules), "provenance": json.dumps(self.provenance)}
        return save(tensors, metadata=meta)

    def _tensors(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Flat float32 tensors named by module index, and the module paths in that order."""
        tensors, modules = {}, []
        for i, (path, (left, right)) in enumerate(sorted(self.factors.items())):
            tensors[f"{i}.left"] = left.detach().float().contiguous().cpu()
            tensors[f"{i}.right"] = right.detach().float().contiguous().cpu()
            if path in self.keys:
                tensors[f"{i}.keys"] = self.keys[path].detach().float().contiguous().cpu()
            modules.append(path)
        return tensors, modules

    @staticmethod
    def _unflatten(
        tensors: dict[str, torch.Tensor], modules: list[str]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        factors = {p: (tensors[f"{i}.left"], tensors[f"{i}.right"]) for i, p in enumerate(modules)}
        keys = {p: tensors[f"{i}.keys"] for i, p in enumerate(modules) if f"{i}.keys" in tensors}
        return factors, keys

    def digest(self) -> str:
        """sha256 of the content (module paths, factor (and key) shapes and float32 bytes,
        provenance as sorted JSON): the delta's content address, the same however it was
        serialised."""
        h = hashlib.sha256()
        for path, (left, right) in sorted(self.factors.items()):
            named = [(path + ".left", left), (path + ".right", right)]
            if path in self.keys:
                named.append((path + ".keys", self.keys[path]))
            for name, t in named:
                t = t.detach().float().contiguous().cpu()
                h.update(f"{name}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps(self.provenance, sort_keys=True).encode())
        return h.hexdigest()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Delta:
        meta = _safetensors_metadata(blob)
        factors, keys = cls._unflatten(load(blob), json.loads(meta["modules"]))
        return cls(factors, json.loads(meta["provenance"]), keys)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, modules = self._tensors()
        save_file(tensors, str(folder / "factors.safetensors"))
        meta = {"modules": modules, "provenance": self.provenance}
        (folder / "delta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> Delta:
        folder = Path(folder)
        meta = json.loads((folder / "delta.json").read_text())
        factors, keys = cls._unflatten(
            load_file(str(folder / "factors.safetensors")), meta["modules"]
        )
        return cls(factors, meta["provenance"], keys)


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


def _param(handle: ModelHandle, path: str) -> torch.Tensor:
    return handle.module(path).weight


def _oriented(handle: ModelHandle, update: torch.Tensor) -> torch.Tensor:
    """(out, in) → the parameter's own layout (GPT-2's Conv1D stores (in, out))."""
    return update.T if handle.adapter.weight_in_out else update


def output_hook(left: torch.Tensor, right: torch.Tensor) -> Any:
    """A forward hook adding ``ΔW k = left (rightᵀ k)`` to the module's output at every position;
    ``left [out, r]`` and ``right [in, r]`` on the module's device, float32."""

    def hook(_module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        key = args[0].float()  # [..., in]
        return output + ((key @ right) @ left.T).to(output.dtype)

    return hook


@torch.no_grad()
def apply_delta(handle: ModelHandle, delta: Delta, alpha: float = 1.0) -> None:
    """weight += alpha·ΔW for every module in ``delta``, in place (addresses stay valid)."""
    for path in sorted(delta.factors):
        weight = _param(handle, path)
        update = _oriented(handle, delta.dense(path).to(weight.device)) * alpha
        weight.copy_((weight.float() + update).to(weight.dtype))


def base_weights(handle: ModelHandle, paths: list[str]) -> dict[str, torch.Tensor]:
    """A copy of the current weights of ``paths`` (the only base tensors edits touch)."""
    return {path: _param(handle, path).detach().clone() for path in sorted(paths)}


@torch.no_grad()
def materialize(
    handle: ModelHandle, base: dict[str, torch.Tensor], deltas: list[Delta]
) -> dict[str, torch.Tensor]:
    """``base + Σ deltas`` per module: float32 accumulation in list order (and in rank-term order
    within a delta), one cast at the end."""
    touched = sorted({path for d in deltas for path in d.factors} | set(base))
    out = {}
    for path in touched:
        if path not in base:
            raise KeyError(f"no base copy of {path}; take base_weights() over every edited module")
        acc = base[path].float().clone()  # float32 accumulator, (out, in) or (in, out)
        for delta in deltas:
            if path not in delta.factors:
                continue
            left, right = (f.to(acc.device) for f in delta.factors[path])  # [out, r], [in, r]
            for j in range(left.shape[1]):
                # One outer product per rank term, added in order: elementwise float32 ops round
                # the same on every device, where a matmul's summation order would not.
                acc += _oriented(handle, left[:, j : j + 1] * right[:, j])
        out[path] = acc.to(base[path].dtype)
    return out


@torch.no_grad()
def load_weights(handle: ModelHandle, weights: dict[str, torch.Tensor]) -> None:
    """Copy materialised tensors into the live parameters, in place."""
    for path, tensor in weights.items():
        _param(handle, path).copy_(tensor)
