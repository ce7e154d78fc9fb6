"""Token positions come from character offsets: BOS and merges cannot shift them."""

from __future__ import annotations

import math

import pytest
import torch

from factpatch.editing.prompts import continuation, continuation_logprobs, encode, pad_batch


def test_subject_last_token_with_bos(tokenizer):
    enc = encode(tokenizer, "{} is located in", "The Eiffel Tower")
    assert enc.ids[0] == tokenizer.bos_token_id
    last = tokenizer.decode([enc.ids[enc.subject_last]])
    assert "Tower".endswith(last.strip()) and last.strip()
    after = tokenizer.decode(enc.ids[enc.subject_last + 1 :])
    assert after == " is located in"


def test_prefix_shifts_the_subject(tokenizer):
    bare = encode(tokenizer, "{} is located in", "The Eiffel Tower")
    prefixed = encode(tokenizer, "{} is located in", "The Eiffel Tower", prefix="Rome is old. ")
    assert prefixed.subject_last > bare.subject_last
    assert prefixed.ids[prefixed.subject_last] == bare.ids[bare.subject_last]
    assert tokenizer.decode(prefixed.ids[prefixed.subject_last + 1 :]) == " is located in"


def test_target_split_in_context(tokenizer):
    enc = encode(tokenizer, "{} is located in the city of", "The Eiffel Tower", target="Rome")
    assert tokenizer.decode(enc.target_ids) == " Rome"
    assert tokenizer.decode(enc.ids[: enc.n_prompt], skip_special_tokens=True) == (
        "The Eiffel Tower is located in the city of"
    )
    ids, n_prompt = continuation(tokenizer, "The Eiffel Tower is in", "Paris")
    assert tokenizer.decode(ids[n_prompt:]) == " Paris"


def test_subject_must_produce_tokens(tokenizer):
    with pytest.raises(ValueError, match="subject"):
        encode(tokenizer, "{} is here", "")


def test_pad_batch_right_pads():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_batched_logprobs_equal_one_at_a_time(tiny_llama):
    """Right padding without a mask is exact for a causal LM."""
    pairs = [("The Eiffel Tower is in", "Rome"), ("BBC One, by", "Sega and friends")]
    together = continuation_logprobs(tiny_llama.model, tiny_llama.tokenizer, pairs, "cpu")
    alone = [
        continuation_logprobs(tiny_llama.model, tiny_llama.tokenizer, [p], "cpu")[0] for p in pairs
    ]
    for a, b in zip(together, alone, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
