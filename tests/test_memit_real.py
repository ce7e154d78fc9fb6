"""MEMIT and AlphaEdit on the bundled Gemma 3 270M: one small batch end to end.

Uses the user cache (the covariance of the default MEMIT layers is gathered once, a few minutes
on 2 cores, then cached).
"""

from __future__ import annotations

import json

import pytest

from factpatch.editing import (
    apply_delta,
    base_weights,
    compute_alphaedit,
    compute_memit,
    default_memit_hparams,
    load_weights,
)
from factpatch.evaluation.counterfact import request_for
from factpatch.evaluation.sequential import measure_records
from factpatch.models import load_model, weights_hash
from tests.conftest import DATA

pytestmark = pytest.mark.real_model

N_EDITS = 4


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m", device="cpu")


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_batch_of_four_counterfact_edits(gemma, method):
    records = json.loads((DATA / "counterfact_val_sample.json").read_text())[:N_EDITS]
    requests = [request_for(r) for r in records]
    hp = default_memit_hparams(gemma)
    before = measure_records(gemma, records)
    base_hash = weights_hash(gemma.model)
    if method == "memit":
        delta = compute_memit(gemma, requests, hp)
    else:
        delta, state = compute_alphaedit(gemma, requests, hp)
        assert state.n_edits == N_EDITS
    assert weights_hash(gemma.model) == base_hash, "computing the delta changed the model"
    for path, (left, right) in delta.factors.items():
        assert left.shape[1] == right.shape[1] == N_EDITS, path
    base = base_weights(gemma, list(delta.factors))
    apply_delta(gemma, delta)
    try:
        after = measure_records(gemma, records)
    finally:
        load_weights(gemma, base)
    assert weights_hash(gemma.model) == base_hash
    flipped = sum(a["rewrite_new"] > a["rewrite_true"] for a in after)
    assert flipped >= N_EDITS - 1, after
    kept_before = sum(b["nb_true"] > b["nb_new"] for b in before)
    kept_after = sum(a["nb_true"] > a["nb_new"] for a in after)
    assert kept_after >= kept_before - 1, (before, after)
