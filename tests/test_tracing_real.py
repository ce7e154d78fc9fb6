"""Causal tracing on the bundled Gemma 3 270M, for real (about 15 s on a 2-core CPU)."""

from __future__ import annotations

import pytest

from factpatch.models import load_model
from factpatch.tracing import trace
from factpatch.tracing.dataset import knows, load_known
from tests.conftest import DATA

pytestmark = pytest.mark.real_model

# known_1000 record 6, "Catalonia belongs to the continent of" -> Europe: a fact the bundled
# model knows (its greedy answer is " Europe").  See tests/data/README.md for the source.
RECORD_INDEX = 6


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m", device="cpu")


def test_known_fact_traces_to_the_subject_or_the_last_token(gemma):
    fact = load_known(DATA / "known_sample.json")[RECORD_INDEX]
    assert knows(gemma, fact)
    result = trace(gemma, fact.prompt, fact.subject, fact.attribute, kind="hidden")
    assert result.answer == " Europe"
    assert result.clean > result.corrupted + 0.2, (result.clean, result.corrupted)
    assert result.settings["noise_source"]["n_subjects"] == 1195
    token, _ = result.strongest()
    subject_last, last = result.subject_range[1] - 1, len(result.tokens) - 1
    assert token in (subject_last, last), (result.tokens, result.strongest())
