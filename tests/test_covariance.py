"""Covariance statistics: the right numbers, cached with provenance, solved without inverses."""

from __future__ import annotations

import json

import pytest
import torch

from factpatch.corpus import CorpusError, load_corpus
from factpatch.editing import covariance
from factpatch.editing.covariance import covariance_solver, layer_covariances

TEXTS = [
    "Paris is the capital and largest city of France, on the river Seine.",
    "The Colosseum is an elliptical amphitheatre in the centre of the city of Rome.",
    "Short one.",
]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    return str(path)


def test_matches_an_explicit_computation(tiny, corpus_file):
    """Batched, padded, stopped-early accumulation = Σ k kᵀ / n over each text on its own."""
    layer = 1
    keys = []
    handle = tiny.rewrite_module(layer).register_forward_pre_hook(
        lambda _m, args: keys.append(args[0][0])
    )
    try:
        with torch.no_grad():
            for text in TEXTS:
                tiny.model(input_ids=tiny.tokenizer([text], return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    expected = k.T @ k / k.shape[0]
    stats = layer_covariances(tiny, [layer], n_tokens=10_000, corpus=corpus_file)[layer]
    assert stats.n_tokens == k.shape[0]
    torch.testing.assert_close(stats.cov, expected, rtol=1e-5, atol=1e-7)
    assert stats.cov.dtype == torch.float64


def test_cached_with_provenance(tiny_llama, corpus_file, monkeypatch):
    first = layer_covariances(tiny_llama, [0, 2], n_tokens=40, corpus=corpus_file)
    assert first[0].n_tokens == 40 and first[2].n_tokens == 40
    meta = first[2].provenance
    assert meta["model_hash"] == tiny_llama.base_hash and meta["layer"] == 2
    assert meta["corpus"] == "corpus.jsonl" and len(meta["corpus_hash"]) == 64

    def no_recompute(*_args, **_kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(covariance, "accumulate", no_recompute)
    again = layer_covariances(tiny_llama, [0, 2], n_tokens=40, corpus=corpus_file)
    assert torch.equal(again[2].cov, first[2].cov)
    assert again[0].provenance == first[0].provenance


def test_solver_solves_and_regularises_when_needed(tiny_llama, corpus_file):
    # 40 tokens for a 128-wide key: C is singular, so a ridge must be added and reported.
    solver = covariance_solver(tiny_llama, 1, n_tokens=40, corpus=corpus_file)
    assert solver.ridge > 0
    cov = layer_covariances(tiny_llama, [1], n_tokens=40, corpus=corpus_file)[1].cov
    k = torch.randn(cov.shape[0], dtype=torch.float64)
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    x = solver.solve(k)
    residual = (cov + solver.ridge * eye) @ x - k
    assert float(residual.norm() / k.norm()) < 1e-6  # float64, condition number ~1e8


def test_full_rank_needs_no_ridge(tiny_llama):
    solver = covariance_solver(tiny_llama, 1, n_tokens=3000)  # bundled Wikipedia text
    assert solver.ridge == 0.0 and solver.n_tokens == 3000


def test_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one para.\n\nsecond para.\n")
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "c.txt").write_text("   \n")
    assert load_corpus(str(tmp_path / "a.txt")).texts == ("one para.", "second para.")
    assert load_corpus(str(tmp_path / "b.json")).texts == ("x", "y")
    with pytest.raises(CorpusError, match="no text"):
        load_corpus(str(tmp_path / "c.txt"))
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    wiki = load_corpus()
    assert len(wiki.texts) > 9000 and wiki.name == "wikipedia-en-summaries"


def test_statistics_read_a_seeded_random_sample():
    """Not the title-sorted corpus's first corner: a seeded shuffle, the held-out tail left out
    (perplexity is measured there), the same order on every call."""
    from factpatch.corpus import HELD_OUT, Corpus, statistics_sample

    texts = tuple(f"paragraph {i}" for i in range(3 * HELD_OUT))
    corpus = Corpus("numbered", texts)
    sample = statistics_sample(corpus)
    assert sorted(sample) == sorted(texts[:-HELD_OUT])
    assert sample[:50] != list(texts[:50])
    assert statistics_sample(corpus) == sample and statistics_sample(corpus, seed=1) != sample
    small = Corpus("small", texts[:10])  # too small to hold anything back: all of it, shuffled
    assert sorted(statistics_sample(small)) == sorted(small.texts)


def test_covariance_follows_the_sample_order(tiny_llama, corpus_file):
    """With fewer tokens than the corpus holds, C is the mean over the first paragraphs of the
    seeded sample, not of the file's order."""
    from factpatch.corpus import statistics_sample

    layer, keys = 1, []
    texts = statistics_sample(load_corpus(corpus_file))
    assert texts[:2] != TEXTS[:2]  # so that the file's order would give another C
    handle = tiny_llama.rewrite_module(layer).register_forward_pre_hook(
        lambda _m, args: keys.append(args[0][0])
    )
    try:
        with torch.no_grad():
            for text in texts[:2]:
                ids = tiny_llama.tokenizer([text], return_tensors="pt")["input_ids"]
                tiny_llama.model(input_ids=ids)
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    stats = layer_covariances(tiny_llama, [layer], n_tokens=k.shape[0], corpus=corpus_file)[layer]
    torch.testing.assert_close(stats.cov, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)
