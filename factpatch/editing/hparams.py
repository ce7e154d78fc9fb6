"""ROME and MEMIT/AlphaEdit hyperparameters; per-model defaults live in
``factpatch/data/hparams.json`` (top level: ROME; the ``"memit"`` section: MEMIT and AlphaEdit)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from importlib.resources import files
from typing import Any

from factpatch.models.loading import ModelHandle

OPTIMISE_DTYPES = ("model", "auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RomeHParams:
    layer: int
    steps: int = 20  # forward passes of the target optimisation (≤ steps − 1 updates)
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05  # stop once the total loss is below this (reference code)
    # …or, when set, once every target token is the most probable one at its position in every
    # prompt (MPES, Gupta et al. 2025, arXiv 2502.01636)
    early_stop_most_probable: bool = False
    # Keep the unedited model's text around the edit (0, 0: the paper's loss; rome.py): the
    # KL covers this many tokens of its description of the subject ("{} is a" …) and of its
    # continuation after "prompt + new target".
    essence_tokens: int = 0
    continuation_tokens: int = 0
    # …and keeps the unedited answer to this many of targets.ESSENCE_QUESTIONS about the subject
    # (those not answered with the edited relation's current answer or the new target).
    essence_questions: int = 0
    templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (prefix tokens, count)
    template_seed: int = 0
    # The δ optimisation's dtype: "model" (the model's own), a copy of the blocks it re-runs and
    # the head in another dtype ("bfloat16", "float16", "float32"), or "auto" (bfloat16 where
    # the device has it natively: targets.resolve_optimise_dtype); keys and the solve stay as is.
    optimise_dtype: str = "model"
    cov_tokens: int = 100_000
    key_mode: str = "averaged"  # "averaged" (r-ROME, Gupta et al. 2024) or "original"
    max_update_ratio: float = 0.5  # guard: ‖ΔW‖_F / ‖W‖_F above this is refused
    min_denominator_ratio: float = 0.1  # guard: (C⁻¹k̄)ᵀk_den / (C⁻¹k̄)ᵀk̄ below this is refused

    def __post_init__(self) -> None:
        if self.key_mode not in ("averaged", "original"):
            raise ValueError("key_mode: choose 'averaged' or 'original'")
        _check_optimisation(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> RomeHParams:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
        return replace(self, **overrides)


def _check_optimisation(hp: RomeHParams | MemitHParams) -> None:
    """The checks ROME's and MEMIT's settings share: the target optimisation's and the context
    templates' (each ``(prefix tokens, count)`` with both at least 1)."""
    if hp.steps < 0 or hp.lr <= 0 or hp.cov_tokens <= 0:
        raise ValueError("steps must be >= 0; lr and cov_tokens must be positive")
    if hp.optimise_dtype not in OPTIMISE_DTYPES:
        raise ValueError(f"optimise_dtype: choose one of {', '.join(OPTIMISE_DTYPES)}")
    if min(hp.essence_tokens, hp.continuation_tokens, hp.essence_questions) < 0:
        raise ValueError("essence_tokens, continuation_tokens, essence_questions must be >= 0")
    for name in ("templates", "key_templates"):
        for entry in getattr(hp, name, ()):
            if len(entry) != 2 or not all(isinstance(n, int) and n >= 1 for n in entry):
                raise ValueError(f"{name}: each entry is [prefix tokens, count], both >= 1")


def recorded_settings(kind: type, recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded hyperparameters (``kind``: RomeHParams or MemitHParams), JSON-normal,
    with any the run predates at their default (a setting added since behaves as before at
    its default)."""
    defaults = {f.name: f.default for f in fields(kind) if f.default is not MISSING}
    return json.loads(json.dumps({**defaults, **recorded}))


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


@dataclass(frozen=True)
class MemitHParams:
    """MEMIT (Meng et al. 2022b, arXiv 2210.07229) and AlphaEdit (Fang et al. 2025, arXiv
    2410.02355) settings.

    The target-value optimisation (``steps`` … ``template_seed``) is ROME's, run at the last
    layer of ``layers``; ``mom2_update_weight`` is MEMIT's λ and ``prior_weight`` the weight μ
    of the earlier edits' keys in ``Δ = R Kᵀ (λC + μK_pK_pᵀ + KKᵀ)⁻¹`` (μ = 0: the paper's
    MEMIT); ``nullspace_threshold`` and ``nullspace_l2`` are AlphaEdit's eigenvalue threshold
    for the null-space projector P and its α in ``Δ = R Kᵀ P ((K_pK_pᵀ + KKᵀ)P + αI)⁻¹``.
    """

    layers: tuple[int, ...]
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    early_stop_most_probable: bool = False
    essence_tokens: int = 0
    continuation_tokens: int = 0
    essence_questions: int = 0
    templates: tuple[tuple[int, int], ...] = ((10, 5),)
    template_seed: int = 0
    optimise_dtype: str = "model"  # as RomeHParams
    cov_tokens: int = 100_000
    mom2_update_weight: float = 15_000.0  # λ (GPT-J reference value)
    nullspace_threshold: float = 2e-2  # AlphaEdit: eigenvalues of C below this span P
    nullspace_l2: float = 10.0  # AlphaEdit: α
    prior_weight: float = 0.0  # MEMIT: μ, the earlier edits' weight in λC + μK_pK_pᵀ + KKᵀ
    # Contexts whose keys the solve fits one by one (K Kᵀ → K̄K̄ᵀ + S); () fits the mean only.
    key_templates: tuple[tuple[int, int], ...] = ()
    max_update_ratio: float = 0.5  # guard per layer: ‖ΔW_l‖_F / (‖W_l‖_F·√B) above it is refused

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError("layers: a non-empty, strictly increasing list of layer indices")
        _check_optimisation(self)
        if min(self.mom2_update_weight, self.nullspace_threshold, self.prior_weight) < 0:
            raise ValueError("mom2_update_weight, nullspace_threshold, prior_weight must be >= 0")
        if self.nullspace_l2 <= 0:
            raise ValueError("nullspace_l2 must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> MemitHParams:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
        return _memit(replace(self, **overrides).to_dict())

    def z_hparams(self) -> RomeHParams:
        """ROME's settings for the target-value optimisation at the last edited layer."""
        return RomeHParams(
            layer=self.layers[-1],
            steps=self.steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            kl_factor=self.kl_factor,
            clamp_norm_factor=self.clamp_norm_factor,
            early_stop_loss=self.early_stop_loss,
            early_stop_most_probable=self.early_stop_most_probable,
            essence_tokens=self.essence_tokens,
            continuation_tokens=self.continuation_tokens,
            essence_questions=self.essence_questions,
            templates=self.templates,
            template_seed=self.template_seed,
            optimise_dtype=self.optimise_dtype,
            cov_tokens=self.cov_tokens,
        )


def _memit(values: dict[str, Any]) -> MemitHParams:
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    unknown = set(values) - {f.name for f in fields(MemitHParams)}
    if unknown:
        raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
    for name in ("templates", "key_templates"):
        if name in values:
            values[name] = tuple(tuple(t) for t in values[name])
    if "layers" in values:
        values["layers"] = tuple(int(layer) for layer in values["layers"])
    return MemitHParams(**values)


def default_memit_hparams(handle: ModelHandle, **overrides: Any) -> MemitHParams:
    """The measured MEMIT/AlphaEdit defaults for a bundled model, else the generic ones with
    five consecutive layers ending at about a third of the depth (GPT-J's 3–8 of 28 in the
    paper is the same shape)."""
    section = _table()["memit"]
    values = dict(section["generic"])
    values.update(section["models"].get(handle.name, {}))
    if "layers" not in values:
        end = max(0, round(handle.n_layers / 3) - 1)
        values["layers"] = list(range(max(0, end - 4), end + 1))
    values.update(overrides)
    return _memit(values)
