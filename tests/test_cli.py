"""The command line, in-process, on a tiny model saved as a local Hugging Face folder."""

from __future__ import annotations

import json

import pytest

from factpatch.cli import main
from tests.conftest import DATA

FAST = [
    "--set",
    "cov_tokens=2000",
    "--set",
    "steps=3",
    "--set",
    "templates=[[4,2]]",
    "--set",
    "max_update_ratio=100",
]


@pytest.fixture
def folder(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_edit_json(folder, capsys, tmp_path):
    code = main(
        [
            "edit",
            "--model",
            folder,
            "--device",
            "cpu",
            "--prompt",
            "{} is located in",
            "--subject",
            "The Eiffel Tower",
            "--target",
            "Rome",
            "--old",
            "Paris",
            "--json",
            "--save",
            str(tmp_path / "delta"),
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["module"] == "model.layers.0.mlp.down_proj"
    assert report["steps"] <= 3 and report["update_norm"] > 0
    assert {"keys", "optimise", "solve", "total"} <= set(report["seconds"])
    assert 0 <= report["before"]["p_target"] <= 1 and 0 <= report["after"]["p_old"] <= 1
    assert (tmp_path / "delta" / "factors.safetensors").is_file()


def test_edit_text_output(folder, capsys):
    assert (
        main(
            [
                "edit",
                "--model",
                folder,
                "--prompt",
                "The Eiffel Tower is in",
                "--subject",
                "The Eiffel Tower",
                "--target",
                "Rome",
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "P(Rome)" in out


def test_eval_counterfact_json(folder, capsys):
    code = main(
        [
            "eval",
            "counterfact",
            "--model",
            folder,
            "--data",
            str(DATA / "counterfact_val_sample.json"),
            "--n",
            "2",
            "--json",
            "--quiet",
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("efficacy", "paraphrase", "neighborhood", "score", "seconds_per_edit", "n"):
        assert key in report
    assert report["n"] == 2 and 0 <= report["efficacy"] <= 100
    assert set(report["unedited"]) >= {"efficacy", "paraphrase", "neighborhood"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "model:"),
        (["--subject", "Big Ben"], "subject:"),
        (["--target", " "], "target:"),
        (["--set", "bogus=1"], "unknown hyperparameters"),
        (["--layer", "40"], "layer:"),
    ],
)
def test_bad_input_exits_2_and_names_the_field(folder, capsys, argv, message):
    args = {
        "--model": folder,
        "--prompt": "The Eiffel Tower is in",
        "--subject": "The Eiffel Tower",
        "--target": "Rome",
    }
    extra = dict(zip(argv[::2], argv[1::2], strict=True))
    flat = []
    for key, value in {**args, **extra}.items():
        if key != "--set":
            flat += [key, value]
    if "--set" in extra:
        flat += ["--set", extra["--set"]]
    assert main(["edit", *flat, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_refused_edit_exits_3(folder, capsys):
    argv = [
        "edit",
        "--model",
        folder,
        "--prompt",
        "{} is in",
        "--subject",
        "The Eiffel Tower",
        "--target",
        "Rome",
        *FAST,
        "--set",
        "max_update_ratio=1e-9",
    ]
    assert main(argv) == 3
    assert "refused" in capsys.readouterr().err
