"""ROME hyperparameters; per-model defaults live in ``factpatch/data/hparams.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from importlib.resources import files
from typing import Any

from factpatch.models.loading import ModelHandle


@dataclass(frozen=True)
class RomeHParams:
    layer: int
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_nll: float = 0.05  # stop once the target's mean NLL is below this
    templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (prefix tokens, count)
    template_seed: int = 0
    cov_tokens: int = 100_000
    key_mode: str = "averaged"  # "averaged" (r-ROME, Gupta et al. 2024) or "original"
    max_update_ratio: float = 0.5  # guard: ‖ΔW‖_F / ‖W‖_F above this is refused
    min_denominator_ratio: float = 0.1  # guard: (C⁻¹k̄)ᵀk_den / (C⁻¹k̄)ᵀk̄ below this is refused

    def __post_init__(self) -> None:
        if self.key_mode not in ("averaged", "original"):
            raise ValueError("key_mode: choose 'averaged' or 'original'")
        if self.steps < 0 or self.lr <= 0 or self.cov_tokens <= 0:
            raise ValueError("steps must be >= 0; lr and cov_tokens must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> RomeHParams:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
        return replace(self, **overrides)


def _table() -> dict[str, Any]:
    return json.loads(files("factpatch").joinpath("data/hparams.json").read_text())


def default_hparams(handle: ModelHandle, **overrides: Any) -> RomeHParams:
    """The measured defaults for a bundled model, else the generic ones with the layer set at
    about a third of the depth (where causal tracing puts the MLP effect in the paper)."""
    table = _table()
    values = dict(table["generic"])
    values.update(table["models"].get(handle.name, {}))
    values.setdefault("layer", max(0, round(handle.n_layers / 3) - 1))
    values.update(overrides)
    if "templates" in values:
        values["templates"] = tuple(tuple(t) for t in values["templates"])
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = set(values) - {f.name for f in fields(RomeHParams)}
    if unknown:
        raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
    return RomeHParams(**values)
