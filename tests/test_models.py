"""Model loading and the architecture adapter table."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from factpatch.models import (
    ADAPTERS,
    ModelLoadError,
    UnsupportedArchitectureError,
    adapter_for,
    load_model,
    weights_hash,
)
from tests.conftest import FF, HIDDEN, LAYERS


def test_adapter_names_real_modules(tiny):
    a = tiny.adapter
    assert tiny.n_layers == LAYERS
    for layer in range(LAYERS):
        for path in (a.block_path(layer), a.mlp_path(layer), a.attn_path(layer)):
            tiny.module(path)
    assert tiny.module(a.final_norm) is not None
    assert tiny.module(a.embed).weight.shape[1] == HIDDEN
    assert tiny.module(a.head).weight.shape[1] == HIDDEN


def test_logits_and_post_mlp_norm_from_the_table(tiny):
    """``handle.logits`` (final norm, head, soft-capping) is the model's own output, and the
    post-MLP norm is the block's where the family has one (Gemma 2/3) and None elsewhere."""
    ids = torch.tensor([[1, 5, 9, 12, 7]], device=tiny.device)
    gemma3 = tiny.model.config.model_type == "gemma3_text"
    if gemma3:  # a strong cap, so that a missing or misplaced one shows
        tiny.model.config.final_logit_softcapping = 0.5
    with torch.no_grad():
        out = tiny.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        # hidden_states[-1] is after the final norm in every family here
        torch.testing.assert_close(tiny.head_logits(out.hidden_states[-1][0]), out.logits[0])
    if gemma3:
        assert tiny.logit_softcap == 0.5 and float(out.logits.abs().max()) <= 0.5
        block = tiny.module(tiny.adapter.block_path(2))
        assert tiny.post_mlp_norm(2) is block.post_feedforward_layernorm
    else:
        assert tiny.post_mlp_norm(2) is None


def test_rewrite_weight_is_out_by_in(tiny):
    """Every family's W maps the MLP's inner width to the model width, whatever its storage."""
    d_in = tiny.model.config.to_dict().get("n_inner") or 4 * HIDDEN
    if tiny.adapter.family not in ("gpt2", "gptj"):
        d_in = FF
    w = tiny.rewrite_weight(1)
    assert tuple(w.shape) == (HIDDEN, d_in)
    keys = torch.randn(3, d_in)
    out = tiny.rewrite_module(1)(keys)
    bias = getattr(tiny.rewrite_module(1), "bias", None)
    expected = keys @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(out, expected)


def test_every_family_has_one_adapter():
    types = [t for a in ADAPTERS for t in a.model_types]
    assert len(types) == len(set(types))


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for("bert")
    assert "bert" in str(err.value) and "gemma3_text" in str(err.value) and "gpt2" in str(err.value)


def test_unknown_alias_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a bundled alias"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_folder_that_is_not_a_causal_lm(tmp_path):
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_local_folder_round_trip(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.base_hash == tiny_llama.base_hash
    assert loaded.adapter.family == "llama"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_weights_hash_sees_one_changed_element(tiny_llama):
    before = weights_hash(tiny_llama.model)
    with torch.no_grad():
        tiny_llama.rewrite_weight(2)[0, 0] += 1e-3
    assert weights_hash(tiny_llama.model) != before


def test_bad_dtype_names_the_field():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("gemma-3-270m", device="cpu", dtype="float8")
