"""Architecture adapters: the one table that says where each model family keeps its parts.

Every path is relative to the ``*ForCausalLM`` module. ``{i}`` in a block path is the layer index.
The *rewrite* module is the MLP output projection that ROME treats as a key→value memory: its
input is the key ``k`` and its output the value ``v`` (Meng et al. 2022, section 3).

``weight_in_out`` marks modules that store their weight as (in, out) — GPT-2's ``Conv1D`` —
rather than ``nn.Linear``'s (out, in).  Every formula in factpatch is written for the maths
orientation ``W: (out, in)``; :func:`math_weight` gives that view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of transformer blocks
    mlp: str  # MLP module, relative to a block
    rewrite: str  # MLP output projection (ROME's W), relative to a block
    attn: str  # attention module, relative to a block
    final_norm: str
    embed: str
    head: str
    weight_in_out: bool = False
    # The norm between the MLP output and the residual stream, relative to a block (Gemma 2/3
    # rescale the MLP output before adding it), or None where the output is added as it is.
    post_mlp_norm: str | None = None
    # The keyword a block passes its attention's key/value cache by (transformers' name).
    cache_kwarg: str = "cache"

    def block_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def rewrite_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.rewrite}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp}"

    def attn_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"


_LLAMA_LIKE = dict(
    blocks="model.layers",
    mlp="mlp",
    rewrite="mlp.down_proj",
    attn="self_attn",
    final_norm="model.norm",
    embed="model.embed_tokens",
    head="lm_head",
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        mlp="mlp",
        rewrite="mlp.c_proj",
        attn="attn",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        head="lm_head",
        weight_in_out=True,
    ),
    Adapter(
        family="gptj",
        model_types=("gptj",),
        blocks="transformer.h",
        mlp="mlp",
        rewrite="mlp.fc_out",
        attn="attn",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        head="lm_head",
    ),
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        mlp="mlp",
        rewrite="mlp.dense_4h_to_h",
        attn="attention",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        head="lm_head",
        cache_kwarg="layer_past",
    ),
    Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    Adapter(family="gemma", model_types=("gemma",), **_LLAMA_LIKE),
    Adapter(
        family="gemma",
        model_types=("gemma2", "gemma3_text"),
        post_mlp_norm="post_feedforward_layernorm",
        **_LLAMA_LIKE,
    ),
)


class UnsupportedArchitectureError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; supported model types: "
        + ", ".join(supported_model_types())
    )


def math_weight(module: nn.Module, adapter: Adapter) -> torch.Tensor:
    """The rewrite module's weight as an (out, in) view (no copy)."""
    weight = module.weight
    return weight.T if adapter.weight_in_out else weight
