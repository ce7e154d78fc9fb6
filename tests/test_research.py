"""The research tools (research/): replays of recorded MEMIT runs, re-measurement and plots,
on the tiny model.  The product never imports them (tests/test_layering.py)."""

from __future__ import annotations

import json

import pytest
import torch

from factpatch.editing import base_weights, load_weights
from factpatch.models import weights_hash
from tests.conftest import val_sample


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_replay_reproduces_the_recorded_run_and_a_larger_lambda_edits_less(
    prior_weight, tiny_llama, memit_hparams, tmp_path
):
    from factpatch.editing import materialize
    from factpatch.evaluation.sequential import evaluate_sequential
    from research.memit_replay import load_run, replay, run_covariance

    records = val_sample()[:4]
    hp = memit_hparams.with_overrides(layers=(1,), steps=2, prior_weight=prior_weight)
    options = dict(batch=2, fluency_prompts=2, fluency_tokens=5, ppl_paragraphs=2, progress=False)
    evaluate_sequential(tiny_llama, records, "memit", hp, checkpoint=tmp_path, **options)
    report, deltas = load_run(tmp_path)
    path = tiny_llama.adapter.rewrite_path(1)
    base = base_weights(tiny_llama, [path])
    recorded = materialize(tiny_llama, {path: base[path]}, deltas)[path]
    load_weights(tiny_llama, {path: recorded})
    recorded_w = tiny_llama.rewrite_weight(1).double().clone()
    load_weights(tiny_llama, base)

    same = replay(tiny_llama, report, deltas, records, hp.mom2_update_weight)
    assert len(same) == 2
    torch.testing.assert_close(same[-1], recorded_w, atol=1e-5, rtol=1e-4)
    w0 = base[path].double()
    stronger = replay(tiny_llama, report, deltas, records, 100 * hp.mom2_update_weight)
    assert (stronger[-1] - w0).norm() < 0.5 * (same[-1] - w0).norm()
    halved = replay(tiny_llama, report, deltas, records, hp.mom2_update_weight, scale=0.5)
    torch.testing.assert_close(halved[0] - w0, 0.5 * (same[0] - w0))
    # another covariance goes into the solve: C twice as large is λ twice as large
    cov = run_covariance(tiny_llama, report)
    doubled = replay(tiny_llama, report, deltas, records, hp.mom2_update_weight, cov=2 * cov)
    twice = replay(tiny_llama, report, deltas, records, 2 * hp.mom2_update_weight)
    torch.testing.assert_close(doubled[-1], twice[-1])
    assert not torch.allclose(doubled[-1], same[-1])
    # the earlier batch's keys in the solve (μ = 1) or not (μ = 0): the run's μ reproduces it
    other = replay(
        tiny_llama, report, deltas, records, hp.mom2_update_weight, prior=1 - prior_weight
    )
    torch.testing.assert_close(other[0], same[0])  # the first batch has no earlier keys
    assert not torch.allclose(other[-1], same[-1], atol=1e-5, rtol=1e-4)
    # the ridge α·I joins λC: the same as re-solving with C + (α/λ)·I, and ‖ΔW‖_F shrinks
    lam = hp.mom2_update_weight
    alpha = lam * float(torch.trace(cov)) / cov.shape[0]  # λ × C's mean eigenvalue
    ridged = replay(tiny_llama, report, deltas, records, lam, ridge=alpha)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    shifted = replay(tiny_llama, report, deltas, records, lam, cov=cov + (alpha / lam) * eye)
    torch.testing.assert_close(ridged[-1], shifted[-1])
    assert (ridged[0] - w0).norm() < (same[0] - w0).norm()
    # scored as an experiment's replay line: the run's last point, and the weights put back
    from factpatch.evaluation.sequential import heldout_paragraphs, run_paragraphs
    from research.memit_replay import scored_replay

    held, _ = heldout_paragraphs(None, run_paragraphs(report))
    before = weights_hash(tiny_llama.model)
    line = scored_replay(tiny_llama, report, deltas, records, held, base, lam, cov.double())
    assert weights_hash(tiny_llama.model) == before
    last = report["curve"][-1]
    assert line["perplexity"] == pytest.approx(last["perplexity"], rel=1e-5)
    assert [line[k] for k in ("efficacy", "paraphrase", "neighborhood")] == [
        last[k] for k in ("efficacy", "paraphrase", "neighborhood")
    ]
    change = recorded_w - w0
    assert line["wear"] == pytest.approx(
        float(torch.trace(change @ cov.double() @ change.T)), rel=1e-3
    )
    assert line["perplexity_change"] == pytest.approx(
        line["perplexity"] / report["unedited_perplexity"] - 1
    )


def test_replay_refuses_runs_it_cannot_reproduce(tmp_path):
    from research.memit_replay import load_run

    for method, layers in (("alphaedit", [1]), ("memit", [1, 2])):
        (tmp_path / "progress.json").write_text(json.dumps({"method": method, "layers": layers}))
        with pytest.raises(ValueError, match="only single-layer MEMIT"):
            load_run(tmp_path)
    report = {"method": "memit", "layers": [1], "hparams": {"key_templates": [[10, 20]]}}
    (tmp_path / "progress.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="key_templates"):
        load_run(tmp_path)


def test_plot_labels_tell_apart_runs_of_one_method():
    from research.plot import labels

    runs = [
        {"method": "memit", "hparams": {"clamp_norm_factor": 1.0, "layers": [2]}},
        {"method": "memit", "hparams": {"clamp_norm_factor": 0.5, "layers": [2]}},
        {"method": "alphaedit", "hparams": {"clamp_norm_factor": 1.0, "layers": [2]}},
    ]
    assert labels(runs) == [
        "memit (clamp=1)",
        "memit (clamp=0.5)",
        "alphaedit",
    ]
    # a setting a run does not record (it predates it) reads as its default
    runs.append(
        {
            "method": "memit",
            "hparams": {"clamp_norm_factor": 0.5, "layers": [2], "prior_weight": 1.0},
        }
    )
    assert labels(runs)[1] == "memit (clamp=0.5, μ=0)"
    assert labels(runs)[3] == "memit (clamp=0.5, μ=1)"
    # the same run measured behind a key gate
    runs.append({**runs[3], "gate_threshold": 0.5})
    assert labels(runs)[3:] == [
        "memit (clamp=0.5, gate τ=none, μ=1)",
        "memit (clamp=0.5, gate τ=0.5, μ=1)",
    ]


def test_remeasure_rebuilds_every_point_of_a_run(tiny_llama, memit_hparams, tmp_path):
    from factpatch.evaluation.sequential import evaluate_sequential
    from research.remeasure import remeasure_perplexity

    records = val_sample()[:4]
    hp = memit_hparams.with_overrides(steps=2)
    options = dict(batch=2, fluency_prompts=2, fluency_tokens=5, progress=False)
    evaluate_sequential(
        tiny_llama,
        records,
        "memit",
        hp,
        checkpoint=tmp_path,
        max_batches=1,
        ppl_paragraphs=2,
        **options,
    )
    # Resumed with another count: the run keeps the paragraphs it started with.
    report = evaluate_sequential(
        tiny_llama, records, "memit", hp, checkpoint=tmp_path, ppl_paragraphs=3, **options
    )
    assert report["complete"]
    before = weights_hash(tiny_llama.model)
    same = remeasure_perplexity(tiny_llama, tmp_path, 2)
    assert weights_hash(tiny_llama.model) == before
    assert same["unedited_perplexity"] == report["unedited_perplexity"]
    assert [p["perplexity"] for p in same["curve"]] == [p["perplexity"] for p in report["curve"]]
    wider = remeasure_perplexity(tiny_llama, tmp_path, 3)
    assert [p["n_edits"] for p in wider["curve"]] == [2, 4]
    assert wider["corpus_indices"][1] - wider["corpus_indices"][0] == 2
    assert wider["curve"][1]["perplexity"] != same["curve"][1]["perplexity"]
    from research.plot import main as plot_main
    from research.plot import plot, with_perplexity

    progress = json.loads((tmp_path / "progress.json").read_text())
    swapped = with_perplexity(progress, wider)
    assert [p["perplexity"] for p in swapped["curve"]] == [p["perplexity"] for p in wider["curve"]]
    assert swapped["unedited_perplexity"] == wider["unedited_perplexity"]
    assert [p["efficacy"] for p in swapped["curve"]] == [p["efficacy"] for p in progress["curve"]]
    (tmp_path / "ppl.jsonl").write_text(json.dumps(wider) + "\n")
    args = [str(tmp_path / "progress.json"), "--perplexity", str(tmp_path / "ppl.jsonl")]
    assert plot_main([*args, "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    plot([report], str(tmp_path / "curve.png"), "tiny")
    assert (tmp_path / "curve.png").stat().st_size > 0
