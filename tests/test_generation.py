"""Text measures of an edit (factpatch.evaluation.generation) on hand-made text and tiny models."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch

from factpatch.evaluation.generation import (
    GENERIC_PROMPTS,
    Probe,
    essence_kept,
    essence_probes,
    generate,
    is_degenerate,
    mentions,
    ngram_entropy,
    special_token_ids,
    subject_prompts,
    text_report,
)
from tests.conftest import DATA, make_tokenizer

RECORD = json.loads((DATA / "counterfact_val_sample.json").read_text())[0]
# Token lengths differ (checked in the test), so the batch really is padded.
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Rome is",
    "BBC One, by",
    "Danielle Darrieux was born in",
]


# --- ngram_entropy ----------------------------------------------------------------------------


def test_ngram_entropy_exact_value():
    # words a b a b: bigrams ab, ba, ab → H2 = H(2/3, 1/3); trigrams aba, bab → H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert ngram_entropy("A b a B") == pytest.approx(expected)  # case is folded
    assert ngram_entropy("A b a B", fold_case=False) > expected  # or kept: 3 distinct bigrams


def test_ngram_entropy_counts_punctuation_as_words():
    # hello , hello: two distinct bigrams (H2 = 1), one trigram (H3 = 0).
    assert ngram_entropy("Hello, hello") == pytest.approx(1 / 3)


def test_ngram_entropy_orders_repetitive_below_varied():
    repetitive = "the city the city the city the city the city the city"
    varied = "the tower stands in paris near the river seine since eighteen eighty nine"
    assert ngram_entropy(repetitive) < ngram_entropy(varied)
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("one") == 0.0


# --- is_degenerate and special_token_ids ------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "reason"),
    [
        ([], None),
        ([5, 6, 7, 8, 9, 10, 11, 12], None),
        ([5, 0, 6], "special"),
        ([0, 0, 0, 0, 0], "special"),  # special comes first
        ([5, 6, 7, 7, 7, 7, 8], "repeat"),
        ([5, 6, 7, 7, 7, 8, 7], None),  # a run of 3 is allowed
        ([5, 6] * 4, "low-diversity"),  # 2 distinct of 8 < 0.3
        ([5, 6, 5, 6, 5, 6, 5], None),  # under 8 ids: not judged on diversity
        ([5, 6, 7] * 3, None),  # 3 distinct of 9 ≥ 0.3
    ],
)
def test_is_degenerate(ids: list[int], reason: str | None):
    assert is_degenerate(ids, {0, 1}) == reason


def test_special_token_ids_exclude_eos_and_include_added_specials():
    tok = make_tokenizer()  # a private copy: the session fixture stays unchanged
    tok.add_tokens(["<ctl>"], special_tokens=True)
    tok.add_tokens(["zzqx"])  # added but not special
    tok.add_tokens(["<start_of_image>", "[multimodal]", "\n\n"])  # as Gemma 3 adds them
    ids = special_token_ids(tok)
    # Markup added as plain tokens is control (Gemma 3 leaves <start_of_image> unflagged) ...
    for control in ("<start_of_image>", "[multimodal]"):
        assert tok.convert_tokens_to_ids(control) in ids
    assert tok.convert_tokens_to_ids("\n\n") not in ids  # ... added whitespace is text
    assert tok.eos_token_id == 2
    assert 2 not in ids
    assert {0, 1, tok.convert_tokens_to_ids("<ctl>")} <= ids
    assert tok.convert_tokens_to_ids("zzqx") not in ids


# --- mentions and subject_prompts -------------------------------------------------------------


def test_mentions_is_case_insensitive_and_whole_word():
    assert mentions("He was born in PARIS, France.", "Paris")
    assert mentions("He moved to New York in 1990", "new york")
    assert not mentions("a Parisian cafe", "Paris")
    assert not mentions("Comparison", "Paris")
    assert mentions("the U.S. army", "U.S.")
    assert not mentions("anything", "")


def test_subject_prompts():
    prompts = subject_prompts(RECORD)
    assert prompts[:2] == [RECORD["prompt"], RECORD["rephrase_prompt"]]
    assert prompts[2:] == [g.format(RECORD["subject"]) for g in GENERIC_PROMPTS]
    assert "BBC One was founded in" in prompts


# --- generate ---------------------------------------------------------------------------------


def test_batched_greedy_equals_one_by_one(tiny):
    tok = tiny.tokenizer
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)
    batched = generate(tiny.model, tok, PROMPTS, max_new_tokens=8)
    alone = [generate(tiny.model, tok, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.prompt for g in batched] == PROMPTS


def test_greedy_matches_transformers_generate(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    for g in generate(model, tok, PROMPTS, max_new_tokens=8):
        enc = tok(g.prompt, return_tensors="pt").to(tiny_llama.device)
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc.input_ids.shape[1] :]
        assert g.token_ids == ref.tolist()
        assert len(g.token_ids) == 8  # no EOS from this model within 8 tokens
        assert g.text == tok.decode(ref, skip_special_tokens=False)


def test_sampling_is_seeded(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer

    def ids(seed: int, top_k: int = 5) -> list[list[int]]:
        out = generate(model, tok, PROMPTS, max_new_tokens=12, top_k=top_k, seed=seed)
        return [g.token_ids for g in out]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    greedy = [g.token_ids for g in generate(model, tok, PROMPTS, max_new_tokens=12)]
    assert ids(0) != greedy
    assert ids(3, top_k=1) == greedy  # the top-1 softmax is the argmax


def test_greedy_and_sampled_rows_in_one_batch_equal_two_batches(tiny_llama):
    """A per-row top_k: the greedy rows read as a greedy batch, the sampled rows as a sampled
    batch with the same seed (how text_report runs both settings in one decode)."""
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    n = len(PROMPTS)
    mixed = generate(model, tok, PROMPTS * 2, max_new_tokens=12, top_k=[0] * n + [5] * n, seed=4)
    greedy = generate(model, tok, PROMPTS, max_new_tokens=12)
    sampled = generate(model, tok, PROMPTS, max_new_tokens=12, top_k=5, seed=4)
    assert [g.token_ids for g in mixed] == [g.token_ids for g in greedy + sampled]
    assert [g.token_ids for g in sampled] != [g.token_ids for g in greedy]
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tok, PROMPTS, top_k=[0, 5, 3, 0])  # two different k


class _EosAs:
    """The tokenizer with another token id playing EOS."""

    def __init__(self, tok: Any, eos: int):
        self._tok, self.eos_token_id = tok, eos

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_a_row_stops_at_eos_alone(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    normal = generate(model, tok, PROMPTS, max_new_tokens=8)
    stop = normal[0].token_ids[2]
    cut = normal[0].token_ids.index(stop)
    out = generate(model, _EosAs(tok, stop), PROMPTS, max_new_tokens=8)
    assert out[0].token_ids == normal[0].token_ids[:cut]
    assert out[0].text == tok.decode(normal[0].token_ids[:cut])
    for mine, ref in zip(out[1:], normal[1:], strict=True):
        if stop in ref.token_ids:
            assert mine.token_ids == ref.token_ids[: ref.token_ids.index(stop)]
        else:
            assert mine.token_ids == ref.token_ids


def test_generation_ends_when_every_row_has_stopped(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = generate(model, tok, PROMPTS[:1], max_new_tokens=8)[0].token_ids
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, _EosAs(tok, ids[2]), PROMPTS[:1], max_new_tokens=8)
    finally:
        hook.remove()
    cut = ids.index(ids[2])
    assert out[0].token_ids == ids[:cut]
    assert len(calls) == cut + 1  # the step that produced EOS was the last


# --- text_report ------------------------------------------------------------------------------


def test_text_report(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    greedy = generate(model, tok, [RECORD["prompt"]], max_new_tokens=12)[0]
    word = re.findall(r"[^\W\d_]+", greedy.text)[0]  # a word the model does say
    report, gens = text_report(model, tok, RECORD, word, max_new_tokens=12)
    assert report.n == len(gens) == 2 * len(subject_prompts(RECORD))
    assert gens[0].token_ids == greedy.token_ids
    own = [gens[0], gens[1], gens[8], gens[9]]
    assert report.consistency == sum(mentions(g.text, word) for g in own) / 4
    assert report.consistency >= 0.25
    assert report.fluency_greedy == pytest.approx(sum(ngram_entropy(g.text) for g in gens[:8]) / 8)
    assert report.fluency_sampled == pytest.approx(sum(ngram_entropy(g.text) for g in gens[8:]) / 8)
    flagged = [is_degenerate(g.token_ids, special_token_ids(tok)) for g in gens]
    assert report.degenerate == sum(f is not None for f in flagged) / 16
    assert sum(report.reasons.values()) == sum(f is not None for f in flagged)
    other, _ = text_report(model, tok, RECORD, "Zyzzyva", max_new_tokens=12)
    assert other.consistency == 0.0


# --- essence ----------------------------------------------------------------------------------


def _top1(handle, prompt: str) -> int:
    enc = handle.tokenizer(prompt, return_tensors="pt").to(handle.device)
    with torch.no_grad():
        return int(handle.model(**enc).logits[0, -1].argmax())


def _a_known_fact(handle, subject: str) -> dict[str, str]:
    """A made-up known fact the random model does 'know': a prompt whose top-1 is a word."""
    tok = handle.tokenizer
    templates = ("{} was created by", "{} is owned by", "{} is a", "{} is the capital of")
    for template in templates:
        prompt = template.format(subject)
        top = _top1(handle, prompt)
        token = tok.decode([top])
        if token.startswith(" ") and token[1:].isalpha():
            word = token[1:]
            ids, full = tok(prompt)["input_ids"], tok(f"{prompt} {word}")["input_ids"]
            if full[: len(ids)] == ids and full[len(ids)] == top:
                return {"subject": subject, "prompt": prompt, "attribute": word}
    raise AssertionError("no prompt here ends in a whole-word prediction")


def test_essence_probes(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    fact = _a_known_fact(tiny_llama, "Rome")
    unknown = {"subject": "Rome", "prompt": "Rome is the birthplace of", "attribute": "Paris"}
    other = {"subject": "Paris", "prompt": "Paris is located in", "attribute": "France"}
    assert tok.decode([_top1(tiny_llama, unknown["prompt"])]) != " Paris"
    probes = essence_probes(model, tok, "Rome", [fact, unknown, other])
    generic = [g.format("Rome") for g in GENERIC_PROMPTS]
    assert [p.prompt for p in probes] == [fact["prompt"], *generic]
    assert [p.source for p in probes] == ["known"] + ["generic"] * len(generic)
    assert all(p.answer_id == _top1(tiny_llama, p.prompt) for p in probes)
    # Excluding the objects of the edited relation drops the probes that answer with them.
    dropped = tok.decode([probes[0].answer_id]).strip()
    assert len(dropped) >= 2
    kept = essence_probes(model, tok, "Rome", [fact], exclude=(f"{dropped.upper()}ville Town", ""))
    assert fact["prompt"] not in [p.prompt for p in kept]
    assert all(tok.decode([p.answer_id]).strip().lower() != dropped.lower() for p in kept)
    assert len(kept) >= 1
    # The exclusion is a prefix match of the answer on the object, not the other way round.
    assert essence_probes(model, tok, "Rome", [fact], exclude=(dropped[:-1],)) == probes


def test_essence_kept_drops_when_the_model_changes(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    probes = essence_probes(model, tok, "Rome", []) + essence_probes(model, tok, "BBC One", [])
    assert len(probes) == 2 * len(GENERIC_PROMPTS)
    assert essence_kept(model, tok, probes) == 1.0
    weight = tiny_llama.rewrite_weight(1)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-5)
        assert essence_kept(model, tok, probes) < 1.0
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert torch.equal(weight, saved)
    assert essence_kept(model, tok, probes) == 1.0
    assert essence_kept(model, tok, []) is None


def test_essence_kept_reads_each_probe_answer(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    probes = essence_probes(model, tok, "Rome", [])
    wrong = [Probe(p.prompt, (p.answer_id + 1) % len(tok), p.source) for p in probes[:2]]
    assert essence_kept(model, tok, probes[2:] + wrong) == pytest.approx(
        (len(probes) - 2) / len(probes)
    )
