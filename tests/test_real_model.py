"""The bundled Gemma 3 270M, for real: loading, and one CounterFact edit end to end.

The first run converts the GGUF once (about a minute) and gathers the covariance statistics of
the default layer once (a few minutes on 2 cores); both are cached in the user cache dir.
"""

from __future__ import annotations

import json

import pytest

from factpatch.editing import apply_delta, compute_edit, default_hparams
from factpatch.evaluation.counterfact import measure, request_for
from factpatch.models import load_model, weights_hash
from tests.conftest import DATA

pytestmark = pytest.mark.real_model

# CounterFact val case_id 10 ("BBC One, by": BBC -> Sega), the first record of the sample; in the
# 200-record evaluation it flipped rewrite and paraphrase and kept its neighbour (margins in
# bench/results/eval_counterfact_val200.json).  See tests/data/README.md for the source.
RECORD_INDEX = 0


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m", device="cpu")


def test_bundled_model_loads(gemma):
    assert gemma.adapter.family == "gemma"
    assert gemma.n_layers == 18
    assert gemma.model.config.model_type == "gemma3_text"
    assert gemma.tokenizer("x")["input_ids"][0] == gemma.tokenizer.bos_token_id


def test_one_counterfact_edit_flips_rewrite_and_paraphrase_not_neighbour(gemma):
    record = json.loads((DATA / "counterfact_val_sample.json").read_text())[RECORD_INDEX]
    before = measure(gemma, record)
    assert before["rewrite_true"] > before["rewrite_new"]  # the model knows the true fact
    assert before["nb_true"] > before["nb_new"]
    base_hash = weights_hash(gemma.model)

    delta = compute_edit(gemma, request_for(record), default_hparams(gemma))
    assert weights_hash(gemma.model) == base_hash
    apply_delta(gemma, delta)
    try:
        after = measure(gemma, record)
    finally:
        apply_delta(gemma, delta, alpha=-1.0)
    assert after["rewrite_new"] > after["rewrite_true"], after
    assert after["para_new"] > after["para_true"], after
    assert after["nb_true"] > after["nb_new"], after
