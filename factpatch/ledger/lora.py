"""A ledger version as a standard LoRA adapter (PEFT's on-disk format).

Every delta is low-rank factors ``ΔW = left @ rightᵀ`` (``left [out, r]``, ``right [in, r]``), so
version N's change to each module is the concatenation of its active deltas' factors, in ledger
order.  PEFT's LoRA computes ``W x + (α / r) · B (A x)`` with ``A [r, in]`` and ``B [out, r]``:
``A = rightᵀ``, ``B = left`` and ``α = r`` (scaling 1) reproduce the version exactly up to float
round-off (the version's materialised weights add ΔW to W before the matmul; LoRA adds the two
products after).  Every module gets the same rank, the largest number of terms any module has;
a module with fewer terms is padded with zero terms (no effect), because multi-LoRA servers such
as vLLM take one rank per adapter.  GPT-2's ``Conv1D`` modules are marked ``fan_in_fan_out``.

Written: ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT), and
``factpatch.json``: the version, its edits, its fingerprint, the base weights' hash, and the
sha256 of the weights file, so the adapter can be traced back to the ledger.

Not exported: key-gated serving (``--gate``) is a serving mode of the replicas, not part of a
version; the adapter is the version as it acts in the weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from factpatch.ledger.ledger import Ledger
from factpatch.models.adapters import ADAPTERS


def lora_factors(ledger: Ledger, version: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the version's ``(left [out, r], right [in, r])``: its active deltas' factors
    concatenated in ledger order (float32)."""
    record = ledger.get(version)
    lefts: dict[str, list[torch.Tensor]] = {}
    rights: dict[str, list[torch.Tensor]] = {}
    for edit_id in record.edits:
        for path, (left, right) in ledger.delta(edit_id).factors.items():
            lefts.setdefault(path, []).append(left.float())
            rights.setdefault(path, []).append(right.float())
    return {p: (torch.cat(lefts[p], 1), torch.cat(rights[p], 1)) for p in sorted(lefts)}


def _fan_in_fan_out(paths: list[str]) -> bool:
    """Whether these modules store their weight as (in, out), from the adapter table: the
    family whose ``blocks.<n>.rewrite`` paths they are."""
    layouts = set()
    for path in paths:
        found = {
            a.weight_in_out
            for a in ADAPTERS
            if re.fullmatch(rf"{re.escape(a.blocks)}\.\d+\.{re.escape(a.rewrite)}", path)
        }
        if not found:
            raise ValueError(f"version: module {path} is not an edit module of a known family")
        layouts |= found
    if len(layouts) > 1:
        raise ValueError("version: its modules disagree on the weight layout")
    return layouts.pop()


def export_lora(ledger: Ledger, version: int, out_dir: str | Path) -> dict[str, Any]:
    """Write version ``version`` as a PEFT LoRA adapter into ``out_dir``; returns the
    ``factpatch.json`` record."""
    record = ledger.get(version)
    factors = lora_factors(ledger, version)
    if not factors:
        raise ValueError(f"version: {version} has no active edits; there is nothing to export")
    fan_in_fan_out = _fan_in_fan_out(list(factors))
    for path, (left, right) in factors.items():
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise ValueError(f"version: {version} has non-finite factors in {path}")
    rank = max(left.shape[1] for left, _ in factors.values())
    tensors = {}
    for path, (left, right) in factors.items():
        pad = rank - left.shape[1]
        a = torch.cat([right.T, right.new_zeros(pad, right.shape[0])])  # [rank, in]
        b = torch.cat([left, left.new_zeros(left.shape[0], pad)], 1)  # [out, rank]
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": record.model,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,  # scaling α / r = 1: the adapter adds exactly ΔW
        "lora_dropout": 0.0,
        "target_modules": sorted(factors),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    info = {
        "version": record.number,
        "edits": list(record.edits),
        "fingerprint": record.fingerprint,
        "base_hash": record.base_hash,
        "model": record.model,
        "modules": {p: int(left.shape[1]) for p, (left, _) in factors.items()},
        "rank": rank,
        "adapter_model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (out / "factpatch.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
