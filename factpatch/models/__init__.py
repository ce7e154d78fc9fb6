"""Model loading and the per-family architecture adapters."""

from factpatch.models.adapters import (
    ADAPTERS,
    Adapter,
    UnsupportedArchitectureError,
    adapter_for,
    math_weight,
)
from factpatch.models.loading import (
    BUNDLED,
    DEFAULT_MODEL,
    ModelHandle,
    ModelLoadError,
    default_device,
    load_model,
    tensor_bytes,
    tensor_sha256,
    weights_hash,
    wrap_model,
)

__all__ = [
    "ADAPTERS",
    "BUNDLED",
    "DEFAULT_MODEL",
    "Adapter",
    "ModelHandle",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "default_device",
    "load_model",
    "math_weight",
    "tensor_bytes",
    "tensor_sha256",
    "weights_hash",
    "wrap_model",
]
