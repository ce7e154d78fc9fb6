"""Settings: one table, flags and environment, and the docs kept in step with the code."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from factpatch.config import OPTIONS, Settings, add_options, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def test_docs_show_the_current_settings_table():
    text = DOCS.read_text()
    start = text.index("<!-- settings table")
    body = text[text.index("\n", start) + 1 : text.index("<!-- end settings table -->")]
    assert body.strip() == markdown_table()


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("FACTPATCH_PORT", "6000")
    monkeypatch.setenv("FACTPATCH_LEDGER", "prod")
    parser = argparse.ArgumentParser()
    add_options(parser, "server")
    settings = Settings.from_args(parser.parse_args(["--ledger", "staging"]))
    assert settings.port == 6000 and settings.ledger == "staging"  # a flag beats the env
    with pytest.raises(SystemExit):
        parser.parse_args(["--hparams", "{}"])  # worker-only option


def test_hparams_json_is_checked():
    assert Settings(hparams='{"layer": 3}').hparam_overrides() == {"layer": 3}
    with pytest.raises(ValueError, match=r"^hparams: not JSON"):
        Settings(hparams="{layer").hparam_overrides()
    with pytest.raises(ValueError, match=r"^hparams: must be a JSON object"):
        Settings(hparams="[1]").hparam_overrides()


def test_settings_and_the_table_agree():
    """Settings repeats the table's defaults so that code constructing it is typed; they must
    not drift apart (``tour`` is the one field the ``up`` command sets without a table entry)."""
    defaults = {f.name: f.default for f in fields(Settings)}
    assert set(defaults) - {"tour"} == {o.dest for o in OPTIONS}
    for option in OPTIONS:
        assert defaults[option.dest] == option.default, option.name
