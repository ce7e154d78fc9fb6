"""Causal tracing on tiny random models: exact identities, the one-forward-per-restoration
reference, determinism, errors, JSON, averages by token class and the command line."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from tokenizers import processors

from factpatch.cli import main
from factpatch.editing.prompts import continuation
from factpatch.models import weights_hash
from factpatch.models.hooks import thread_hooks
from factpatch.paths import cache_dir
from factpatch.tracing import KINDS, TraceResult, encode_prompt, trace, trace_kinds
from factpatch.tracing.core import (
    answer_probs,
    corrupted_run,
    final_hidden,
    noise_hook,
    patch_hook,
    prepare,
    window_layers,
)
from factpatch.tracing.dataset import (
    TOKEN_CLASSES,
    AverageResult,
    KnownFact,
    average_traces,
    knows,
    load_known,
    token_classes,
    trace_dataset,
)
from factpatch.tracing.noise import KNOWN_SUBJECTS, NOISE_FACTOR, subject_embedding_std
from tests.conftest import DATA, TEST_DEVICE, build_tiny
from tests.reference_trace import trace_reference

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
FAST = dict(samples=3, window=3)


def test_shapes_and_settings(tiny_llama):
    result = trace(tiny_llama, PROMPT, SUBJECT, kind="mlp", **FAST)
    encoded = encode_prompt(tiny_llama.tokenizer, PROMPT, SUBJECT)
    n_tokens = len(encoded.ids)
    assert result.matrix.shape == (n_tokens, 4) and result.matrix.dtype == torch.float32
    assert len(result.tokens) == n_tokens and result.tokens[0] == "<bos>"
    assert result.layers == [0, 1, 2, 3]
    start, end = result.subject_range
    assert "".join(result.tokens[start:end]).strip() == SUBJECT
    assert 0 <= result.corrupted <= 1 and 0 <= result.clean <= 1
    assert torch.all(result.matrix[:start] == 0)  # before the subject: exactly no effect
    assert torch.all((result.restored >= 0) & (result.restored <= 1))
    assert result.settings["samples"] == 3 and result.settings["window"] == 3
    assert result.settings["seed"] == 0 and result.settings["noise"] > 0
    assert result.settings["noise_source"]["factor"] == NOISE_FACTOR


def test_window_is_centred_and_clipped():
    assert window_layers(0, 18, 10) == tuple(range(0, 5))
    assert window_layers(9, 18, 10) == tuple(range(4, 14))
    assert window_layers(17, 18, 10) == tuple(range(12, 18))
    assert window_layers(5, 18, 1) == (5,)
    assert window_layers(1, 4, 3) == (0, 1, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_one_forward_per_restoration(tiny, kind):
    """The batched, cached, layer-skipping trace equals the plain reference computation, on
    every family (the prompt is longer than the tiny Gemma 3's sliding window of 8)."""
    assert len(encode_prompt(tiny.tokenizer, PROMPT, SUBJECT).ids) > 8
    fast = trace(tiny, PROMPT, SUBJECT, kind=kind, batch_tokens=60, **FAST)
    slow = trace_reference(tiny, PROMPT, SUBJECT, kind=kind, **FAST)
    assert fast.answer_id == slow.answer_id
    assert fast.clean == pytest.approx(slow.clean, abs=1e-6)
    assert fast.corrupted == pytest.approx(slow.corrupted, abs=1e-6)
    torch.testing.assert_close(fast.matrix, slow.matrix, atol=1e-6, rtol=0)
    assert fast.matrix.abs().max() > 1e-4  # something to compare


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_subject_at_the_first_position(tokenizer, family):
    """Without a begin-of-sequence token the subject can be token 0: no prefix at all."""
    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    handle = build_tiny(family, tokenizer)
    handle.tokenizer = no_bos
    prompt = "Eiffel Tower is located in the city of"
    fast = trace(handle, prompt, SUBJECT, kind="mlp", **FAST)
    assert fast.subject_range[0] == 0 and fast.tokens[0] != "<bos>"
    slow = trace_reference(handle, prompt, SUBJECT, kind="mlp", **FAST)
    torch.testing.assert_close(fast.matrix, slow.matrix, atol=1e-6, rtol=0)


def test_bfloat16_model_matches_the_reference(tokenizer):
    handle = build_tiny("gemma3", tokenizer)
    handle.model.to(torch.bfloat16)
    fast = trace(handle, PROMPT, SUBJECT, kind="mlp", **FAST)
    slow = trace_reference(handle, PROMPT, SUBJECT, kind="mlp", **FAST)
    assert fast.settings["dtype"] == "bfloat16"
    torch.testing.assert_close(fast.matrix, slow.matrix, atol=1e-6, rtol=0)


def test_exact_identities_at_the_last_layer(tiny_llama):
    """Restoring the last block's output changes only its own position's prediction: the last
    token gets exactly the clean P back, every other token exactly nothing."""
    result = trace(tiny_llama, PROMPT, SUBJECT, kind="hidden", **FAST)
    torch.testing.assert_close(
        result.restored[-1, -1], torch.tensor(result.clean), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(result.matrix[:-1, -1], torch.zeros(len(result.tokens) - 1))


@torch.no_grad()
def test_restoring_every_token_of_one_layer_gives_the_clean_run(tiny_llama):
    """With every position of block l's output restored, the corrupted run *is* the clean run
    from l on, for every l: P equals P_clean."""
    handle = tiny_llama
    setup, encoded, clean, _ = prepare(handle, PROMPT, SUBJECT, None, ["hidden"], 3, None, 0)
    corrupted = float(corrupted_run(setup).mean())
    assert clean - corrupted > 1e-3
    embed = handle.module(handle.adapter.embed)
    ids = setup.ids.repeat(3, 1)
    rows = torch.ones(3, dtype=torch.bool)
    for layer in range(handle.n_layers):
        block = handle.module(handle.adapter.block_path(layer))
        hooks = [(embed, noise_hook(setup.noise, setup.subject, 0))]
        hooks += [
            (block, patch_hook(setup.clean["hidden"][layer, t], rows, t))
            for t in range(len(encoded.ids))
        ]
        probs = answer_probs(handle, final_hidden(handle, ids, hooks), setup.answer_id)
        torch.testing.assert_close(probs, torch.full((3,), clean), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_noise_has_zero_effect(tiny_llama, kind):
    result = trace(tiny_llama, PROMPT, SUBJECT, kind=kind, noise=0.0, **FAST)
    assert result.corrupted == pytest.approx(result.clean, abs=1e-6)
    assert float(result.matrix.abs().max()) < 1e-6
    assert result.settings["noise_source"] == {"source": "explicit"}


def test_deterministic_with_a_seed(tiny_llama):
    first = trace(tiny_llama, PROMPT, SUBJECT, seed=7, **FAST)
    again = trace(tiny_llama, PROMPT, SUBJECT, seed=7, **FAST)
    other = trace(tiny_llama, PROMPT, SUBJECT, seed=8, **FAST)
    assert torch.equal(first.matrix, again.matrix) and first.corrupted == again.corrupted
    assert first.corrupted != other.corrupted
    assert not torch.equal(first.matrix, other.matrix)


def test_kinds_traced_together_equal_kinds_traced_alone(tiny_llama):
    together = trace_kinds(tiny_llama, PROMPT, SUBJECT, **FAST)
    for kind in KINDS:
        alone = trace(tiny_llama, PROMPT, SUBJECT, kind=kind, **FAST)
        torch.testing.assert_close(together[kind].matrix, alone.matrix, atol=1e-7, rtol=0)


def test_answer_greedy_or_given(tiny_llama):
    handle = tiny_llama
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]], device=handle.device)
    with torch.no_grad():
        probs = torch.softmax(handle.model(input_ids=ids).logits[0, -1], -1)
    greedy = trace(handle, PROMPT, SUBJECT, **FAST)
    assert greedy.answer_id == int(probs.argmax())
    assert greedy.clean == pytest.approx(float(probs.max()), rel=1e-5)

    given = trace(handle, PROMPT, SUBJECT, answer="Paris", **FAST)
    seq, n_prompt = continuation(handle.tokenizer, PROMPT, "Paris")
    assert given.answer_id == seq[n_prompt]
    assert given.answer == handle.tokenizer.decode([seq[n_prompt]])
    assert given.clean == pytest.approx(float(probs[seq[n_prompt]]), rel=1e-5)


def test_template_prompt_is_the_same_as_the_full_text(tiny_llama):
    full = trace(tiny_llama, PROMPT, SUBJECT, **FAST)
    template = trace(tiny_llama, "The {} is located in the city of", SUBJECT, **FAST)
    assert template.prompt == PROMPT
    assert torch.equal(full.matrix, template.matrix)


def test_input_errors_name_the_field(tiny_llama):
    with pytest.raises(ValueError, match=r"^subject: .*does not occur"):
        trace(tiny_llama, PROMPT, "Colosseum")
    with pytest.raises(ValueError, match=r"^subject: "):
        trace(tiny_llama, PROMPT, "  ")
    with pytest.raises(ValueError, match=r"^kind: "):
        trace(tiny_llama, PROMPT, SUBJECT, kind="residual")
    with pytest.raises(ValueError, match=r"^samples: "):
        trace(tiny_llama, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ValueError, match=r"^window: "):
        trace(tiny_llama, PROMPT, SUBJECT, kind="mlp", window=0)
    with pytest.raises(ValueError, match=r"^noise: "):
        trace(tiny_llama, PROMPT, SUBJECT, noise=-1.0)
    with pytest.raises(ValueError, match=r"^answer: "):
        trace(tiny_llama, PROMPT, SUBJECT, answer=" ")


def test_json_round_trip(tiny_llama):
    result = trace(tiny_llama, PROMPT, SUBJECT, kind="attn", **FAST)
    back = TraceResult.from_json(result.to_json())
    assert torch.equal(back.matrix, result.matrix)
    assert back.to_dict() == result.to_dict()
    assert back.subject_range == result.subject_range and back.strongest() == result.strongest()


def test_noise_level_is_measured_once_and_cached(tiny_llama, tokenizer):
    record = subject_embedding_std(tiny_llama)
    files = list(cache_dir("tracing").glob(f"embed-std-*-{tiny_llama.base_hash[:16]}-*.json"))
    assert len(files) == 1
    on_disk = json.loads(files[0].read_text())
    assert on_disk["std"] == record["std"] and on_disk["model_hash"] == tiny_llama.base_hash
    assert on_disk["n_subjects"] == len(KNOWN_SUBJECTS) == 1195
    # the value is the std of the subjects' token embeddings
    ids = [i for s in KNOWN_SUBJECTS for i in tokenizer(s, add_special_tokens=False)["input_ids"]]
    weights = tiny_llama.module(tiny_llama.adapter.embed).weight.double()
    assert record["std"] == pytest.approx(float(weights[ids].std()), rel=1e-9)
    files[0].write_text(json.dumps({**on_disk, "std": 0.5}))  # a fresh handle reads the file
    tiny_llama.cache.clear()
    result = trace(tiny_llama, PROMPT, SUBJECT, **FAST)
    assert result.settings["noise"] == pytest.approx(NOISE_FACTOR * 0.5)


def test_no_weight_written_no_hook_left_other_threads_untouched(tiny_llama):
    handle = tiny_llama
    before = weights_hash(handle.model)
    ids = handle.tokenizer("Rome is the capital of Italy", return_tensors="pt").input_ids
    ids = ids.to(handle.device)
    with torch.no_grad():
        expected = handle.model(input_ids=ids).logits
    seen: list[bool] = []
    stop = threading.Event()

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                seen.append(torch.equal(handle.model(input_ids=ids).logits, expected))

    server = threading.Thread(target=serve)
    server.start()
    try:
        trace_kinds(handle, PROMPT, SUBJECT, **FAST)
    finally:
        stop.set()
        server.join()
    assert seen and all(seen)
    assert weights_hash(handle.model) == before
    for module in handle.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with thread_hooks():
        pass


def test_token_classes():
    # <bos> The* Eiffel* Tower* is located in
    assert token_classes(7, (1, 4)) == [[1], [2], [3], [4], [5], [6]]
    # one-token subject, then two tokens: first = last subject token; first subsequent = last
    assert token_classes(4, (1, 2)) == [[1], [], [1], [2], [], [3]]
    assert token_classes(3, (1, 2)) == [[1], [], [1], [2], [], [2]]
    # subject at the very end: no subsequent token
    assert token_classes(3, (1, 3)) == [[1], [], [2], [], [], [2]]


def _result(matrix: torch.Tensor, subject: tuple[int, int], clean: float) -> TraceResult:
    n_tokens, n_layers = matrix.shape
    return TraceResult(
        prompt="p", subject="s", answer=" a", answer_id=0, kind="mlp",
        tokens=["t"] * n_tokens, layers=list(range(n_layers)), subject_range=subject,
        clean=clean, corrupted=0.0, matrix=matrix, settings={"samples": 1},
    )  # fmt: skip


def test_average_pools_tokens_by_class():
    # A: <bos> S S S x y (subject 1..3): classes [1] [2] [3] [4] [] [5]
    # B: <bos> S x y z (one-token subject): classes [1] [] [1] [2] [3] [4]
    a = torch.arange(12, dtype=torch.float32).view(6, 2)  # row i = (2i, 2i+1)
    b = 100 + torch.arange(10, dtype=torch.float32).view(5, 2)
    average = average_traces([_result(a, (1, 4), 0.4), _result(b, (1, 2), 0.6)], 3, [0, 5])
    assert average.classes == list(TOKEN_CLASSES)
    assert average.counts == [2, 1, 2, 2, 1, 2]
    expected = torch.tensor(
        [
            [(2 + 102) / 2, (3 + 103) / 2],  # first subject token
            [4, 5],  # middle subject tokens: A's token 2 only
            [(6 + 102) / 2, (7 + 103) / 2],  # last subject token
            [(8 + 104) / 2, (9 + 105) / 2],  # first subsequent token
            [106, 107],  # further tokens: B's token 3 only
            [(10 + 108) / 2, (11 + 109) / 2],  # last token
        ]
    )
    torch.testing.assert_close(average.matrix, expected)
    assert average.n_kept == 2 and average.n_total == 3 and average.kept == [0, 5]
    assert average.clean == pytest.approx(0.5)
    assert average.peak_layer() == 1
    back = AverageResult.from_json(average.to_json())
    assert torch.equal(back.matrix, average.matrix) and back.counts == average.counts


def test_known_facts_sample_and_knowledge_filter(tiny_llama):
    facts = load_known(DATA / "known_sample.json")
    assert len(facts) == 20 and facts[0].subject == "Vinson Massif"
    assert all(f.subject in f.prompt for f in facts)
    # the model "knows" what it greedily says after a space, and not something else
    handle, said = tiny_llama, {}
    for fact in facts:
        ids = torch.tensor([handle.tokenizer(fact.prompt)["input_ids"]], device=handle.device)
        with torch.no_grad():
            greedy = handle.model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        word = handle.tokenizer.decode(greedy[0, -1:])
        if word.startswith(" ") and word.strip().isalpha():
            said[fact.prompt] = word.strip()
    assert said  # some prompts of the sample continue with a word
    for prompt, word in said.items():
        subject = next(f.subject for f in facts if f.prompt == prompt)
        assert knows(handle, KnownFact(0, subject, word, prompt))
        assert not knows(handle, KnownFact(0, subject, "Zanzibar", prompt))


def test_trace_dataset_averages_every_kind(tiny_llama):
    facts = load_known(DATA / "known_sample.json", 3)
    averages, summary = trace_dataset(tiny_llama, facts, only_known=False, **FAST)
    assert summary["n_total"] == 3 and summary["n_kept"] == 3
    assert averages is not None and set(averages) == set(KINDS)
    for average in averages.values():
        assert average.matrix.shape == (6, 4) and average.kept == [0, 1, 2]
        assert average.counts[0] == 3 and average.counts[5] == 3
        assert 0 <= average.peak_layer() < 4
    # The first K traced facts: it stops reading once K are kept.
    averages, summary = trace_dataset(tiny_llama, facts, only_known=False, max_kept=2, **FAST)
    assert summary["n_total"] == 2 and summary["n_kept"] == 2
    assert all(a.kept == [0, 1] for a in averages.values())


@pytest.fixture
def folder(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_cli_writes_a_heatmap_and_json(folder, tmp_path, capsys):
    png = tmp_path / "trace.png"
    args = ["trace", "--model", folder, "--device", TEST_DEVICE, "--prompt", PROMPT]
    args += ["--subject", SUBJECT, "--samples", "2", "--window", "3", "--out", str(png)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == set(KINDS)
    assert len(report["mlp"]["matrix"]) == len(report["mlp"]["tokens"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main([*args[:-2], "--kind", "hidden"]) == 0
    assert "strongest effect" in capsys.readouterr().out


def test_cli_dataset_and_errors(folder, tmp_path, capsys):
    out = tmp_path / "avg"
    args = ["trace", "--model", folder, "--device", TEST_DEVICE, "--samples", "2", "--quiet"]
    code = main([*args, "--dataset", str(DATA / "known_sample.json"), "--n", "2",
                 "--include-unknown", "--kind", "mlp", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "trace_averages.json").read_text())
    assert report["n_total"] == 2 and report["n_kept"] == 2
    assert set(report["averages"]) == {"mlp"}
    assert (out / "average_effects.png").stat().st_size > 5_000
    assert (out / "average_last_subject.png").is_file()
    capsys.readouterr()
    assert main([*args, "--prompt", PROMPT, "--subject", "Colosseum"]) == 2
    assert "subject" in capsys.readouterr().err
    assert main([*args, "--dataset", str(DATA / "known_sample.json")]) == 2  # no --out
