"""Shared fixtures: tiny random models of every supported family, and the bundled Gemma."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from factpatch.editing import Delta, EditRequest, MemitHParams, RomeHParams
from factpatch.ledger import Ledger
from factpatch.models import ModelHandle, wrap_model
from factpatch.store import EmbeddedRedis, connect
from tests.procs import Proc

DATA = Path(__file__).parent / "data"
HIDDEN, FF, LAYERS, HEADS = 64, 128, 4, 4


def _config(family: str, vocab: int):
    # initializer_range 0.1 (not 0.02) so a random model's outputs are not flat, and an edit
    # has a distribution to move.
    common = dict(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1
    )
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256, **common)
    if family == "gptj":
        return GPTJConfig(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256, rotary_dim=8, **common
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=FF,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=256,
            **common,
        )
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "gemma":
        return GemmaConfig(head_dim=16, **llama_like)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=8, **llama_like)
    raise KeyError(family)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma3"]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained here, offline, that prepends <bos> like Gemma/Llama do."""
    texts = [
        r[k]
        for r in json.loads((DATA / "counterfact_val_sample.json").read_text())
        for k in ("prompt", "rephrase_prompt", "locality_prompt", "target_new", "ground_truth")
    ]
    texts += [
        "The Eiffel Tower is located in the city of Paris. Rome is the capital of Italy.",
        "A language model stores facts in its MLP layers, which act as key-value memories.",
    ] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


# The device the tiny models live on: cpu here and in CI; FACTPATCH_TEST_DEVICE=cuda runs the
# same tests on a GPU (bench/device_check.sh).
TEST_DEVICE = os.environ.get("FACTPATCH_TEST_DEVICE", "cpu")


def build_tiny(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> ModelHandle:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)), dtype=torch.float32)
    return wrap_model(model.to(TEST_DEVICE, dtype), tokenizer, name=f"tiny-{family}")


def val_sample() -> list[dict]:
    """The CounterFact validation sample that ships with the tests (tests/data)."""
    return json.loads((DATA / "counterfact_val_sample.json").read_text())


def random_delta(handle: ModelHandle, seed: int, scale: float = 3.0) -> Delta:
    """A strong random rank-one change of one rewrite module (layer = seed mod depth), so that
    versions built from such deltas answer differently."""
    g = torch.Generator().manual_seed(seed)
    layer = seed % handle.n_layers
    w = handle.rewrite_weight(layer)
    left = torch.randn(w.shape[0], 1, generator=g) * scale
    right = torch.randn(w.shape[1], 1, generator=g) / w.shape[1] ** 0.5
    return Delta({handle.adapter.rewrite_path(layer): (left, right)}, {"seed": seed})


@pytest.fixture(params=FAMILIES)
def tiny(request, tokenizer) -> ModelHandle:
    return build_tiny(request.param, tokenizer)


@pytest.fixture
def tiny_llama(tokenizer) -> ModelHandle:
    return build_tiny("llama", tokenizer)


# Small but complete settings: the covariance from 3,000 real Wikipedia tokens.  A random model's
# MLP outputs are tiny, so the reference weight decay (∝ 1/‖v_init‖²) would pin δ at zero; it is
# off here, and the clamp is wide.  MEMIT's λ is small because the tiny covariance is small next
# to K Kᵀ.  (Also read by bench/device_check.py and, as JSON, by tests/test_service.py.)
_TINY_TARGETS = dict(  # the target optimisation, shared by both methods
    steps=13,  # 13 passes: 12 updates
    lr=1.0,
    weight_decay=0.0,
    clamp_norm_factor=20.0,
    templates=((5, 3),),
    cov_tokens=3000,
    max_update_ratio=100.0,
)
TINY_ROME = RomeHParams(layer=1, **_TINY_TARGETS)
TINY_MEMIT = MemitHParams(layers=(0, 1), mom2_update_weight=1.0, nullspace_l2=1e-3, **_TINY_TARGETS)
REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} is the capital of", "Rome", "Germany"),
    EditRequest("{} was born in", "Danielle Darrieux", "Paris"),
]


@pytest.fixture
def tiny_hparams() -> RomeHParams:
    return TINY_ROME


@pytest.fixture
def memit_hparams() -> MemitHParams:
    return TINY_MEMIT


@pytest.fixture
def eiffel() -> EditRequest:
    return EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch, request):
    """Tiny models cache under a per-session folder; the bundled model uses the user cache
    (its one-time conversion and covariance are worth keeping between runs)."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("FACTPATCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis: FACTPATCH_TEST_REDIS_URL if set, else an embedded redis-server."""
    url = os.environ.get("FACTPATCH_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def ledger(redis_url) -> Ledger:
    """A ledger under a fresh name, so tests never see each other's versions."""
    return Ledger(connect(redis_url), name=f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def model_folder(tiny_llama, tmp_path) -> str:
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {
        **os.environ,
        "FACTPATCH_CACHE_DIR": str(tmp_path / "cache"),
        "FACTPATCH_DEVICE": TEST_DEVICE,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",  # four processes on two cores
        # Checks report but never refuse: whether a tiny random model's edit overtakes its old
        # answer is luck (tests/test_checks.py tests the default policy, enforce included).
        "FACTPATCH_CHECKS": "warn",
    }


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.popen.poll() is None:
            p.popen.kill()
