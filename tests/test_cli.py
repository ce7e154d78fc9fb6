"""The command line, in-process, on a tiny model saved as a local Hugging Face folder."""

from __future__ import annotations

import json

import pytest

from factpatch.cli import main, set_overrides
from factpatch.ledger import Ledger
from factpatch.ledger.writer import LedgerWriter
from factpatch.models import load_model, tensor_sha256
from factpatch.runtime import Replica
from tests.conftest import DATA, TEST_DEVICE, random_delta

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
            TEST_DEVICE,
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


def eval_argv(folder: str, *extra: str) -> list[str]:
    """`factpatch eval counterfact` on the first 2 sample records, JSON, fast settings."""
    data = str(DATA / "counterfact_val_sample.json")
    head = ["eval", "counterfact", "--model", folder, "--data", data, "--n", "2"]
    return [*head, "--json", "--quiet", *FAST, *extra]


def test_eval_counterfact_json(folder, capsys):
    code = main(eval_argv(folder))
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("efficacy", "paraphrase", "neighborhood", "score", "seconds_per_edit", "n"):
        assert key in report
    assert report["n"] == 2 and 0 <= report["efficacy"] <= 100
    assert set(report["unedited"]) >= {"efficacy", "paraphrase", "neighborhood"}


def test_eval_counterfact_text_measures(folder, capsys):
    """--text/--known: the text before and after each edit is judged and reported."""
    known = str(DATA / "known_sample.json")
    extra = ["--set", "essence_tokens=3", "--set", "continuation_tokens=2"]
    code = main(eval_argv(folder, "--known", known, *extra))
    assert code == 0
    text = json.loads(capsys.readouterr().out)["text"]
    for key in ("fluency_greedy", "fluency_sampled"):
        assert text[key]["before"] > 0 and text[key]["after"] > 0
        assert text[key]["ratio"] == pytest.approx(text[key]["after"] / text[key]["before"])
    assert 0 <= text["degenerate"]["before"] <= 1 and 0 <= text["degenerate"]["after"] <= 1
    assert set(text["consistency"]) == {"before_true", "after_new"}
    assert text["essence_probes"] > 0 and 0 <= text["essence_kept"] <= 1


def test_known_facts_keeps_what_the_model_ranks_first(tiny_llama):
    """A record counts as known when the unedited model's top next token starts its true
    object; found here by search over the sample's prompts and answers (a random model)."""
    from factpatch.editing.prompts import continuation
    from factpatch.evaluation.counterfact import known_facts

    tok = tiny_llama.tokenizer
    sample = json.loads((DATA / "counterfact_val_sample.json").read_text())
    words = sorted({r[k] for r in sample for k in ("target_new", "ground_truth")})
    for record in sample:
        ids = tok(record["prompt"], return_tensors="pt")["input_ids"]
        top = int(tiny_llama.model(input_ids=ids).logits[0, -1].argmax())
        first = {w: (lambda c: c[0][c[1]])(continuation(tok, record["prompt"], w)) for w in words}
        hits = [w for w in words if first[w] == top]
        if hits:
            miss = next(w for w in words if first[w] != top)
            records = [
                {**record, "ground_truth": miss, "case_id": "miss"},
                {**record, "ground_truth": hits[0], "case_id": "hit"},
            ]
            assert [r["case_id"] for r in known_facts(tiny_llama, records, None)] == ["hit"]
            assert known_facts(tiny_llama, records * 3, 2) == [records[1], records[1]]
            return
    pytest.skip("the tiny model ranks no sample answer first")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "model:"),
        (["--subject", "Big Ben"], "subject:"),
        (["--target", " "], "target:"),
        (["--set", "bogus=1"], "unknown hyperparameters"),
        (["--set", "key_mode=sideways"], "key_mode"),
        (["--set", "templates=[[10,0]]"], "templates:"),
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
    assert main(["edit", *FAST, *flat]) == 2  # flat last: its --set wins over FAST's
    assert message in capsys.readouterr().err


def test_set_values_are_json_or_plain_strings():
    items = ["lr=0.3", "layers=[4, 5]", "key_mode=original", 'corpus="a b"', "x=a=b"]
    assert set_overrides(items) == {
        "lr": 0.3,
        "layers": [4, 5],
        "key_mode": "original",
        "corpus": "a b",
        "x": "a=b",
    }


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


def test_ledger_commands(folder, ledger, redis_url, capsys, tmp_path):
    handle = load_model(folder, device=TEST_DEVICE)
    replica = Replica(handle, ledger).start()
    for seed in range(2):
        LedgerWriter(replica.ledger, replica).add_edits(
            [random_delta(handle, seed)], [[{"seed": seed}]], replica.version
        )
    store = ["--redis-url", redis_url, "--ledger", ledger.name]

    assert main(["ledger", "list", *store, "--json"]) == 0
    assert [v["number"] for v in json.loads(capsys.readouterr().out)] == [0, 1, 2]
    assert main(["ledger", "show", "2", *store]) == 0
    assert '{"seed": 1}' in capsys.readouterr().out

    model = ["--model", folder, "--device", TEST_DEVICE]
    assert main(["ledger", "rollback", "--to", "1", *store, "--json"]) == 0  # no model
    rolled = json.loads(capsys.readouterr().out)
    assert rolled["number"] == 3 and rolled["actor"] == "cli"
    assert ledger.head() == 3
    v1 = ledger.get(1).hashes
    assert {p: rolled["hashes"][p] for p in v1} == v1
    base = load_model(folder, device=TEST_DEVICE)  # a module touched only by edit 2 is back at base
    for p in set(rolled["hashes"]) - set(v1):
        assert rolled["hashes"][p] == tensor_sha256(base.module(p).weight)

    assert main(["ledger", "export", str(tmp_path / "snap"), *store]) == 0
    copy = ["--redis-url", redis_url, "--ledger", ledger.name + "-copy"]
    assert main(["ledger", "import", str(tmp_path / "snap"), *copy]) == 0
    assert "head is version 3" in capsys.readouterr().out
    copied = Ledger(ledger.redis, ledger.name + "-copy")
    assert copied.versions() == ledger.versions()
    assert copied.base_hashes() == ledger.base_hashes() and ledger.base_hashes()

    edit_2 = ledger.get(2).edits[-1]
    assert main(["ledger", "rollback", "--to", "2", *store]) == 0
    capsys.readouterr()
    assert main(["ledger", "revert", edit_2, *store, *model, "--json"]) == 0
    reverted = json.loads(capsys.readouterr().out)
    assert reverted["edits"] == list(ledger.get(1).edits) and reverted["number"] == 5
    assert reverted["hashes"] == rolled["hashes"]  # version 1's edits, materialised again

    assert main(["ledger", "show", "99", *store]) == 4
    assert "version: 99 does not exist" in capsys.readouterr().err
