"""Edit requests are validated; every error names its field."""

from __future__ import annotations

import pytest

from factpatch.editing import EditRequest, InvalidEditError


def test_from_prompt_makes_a_template():
    r = EditRequest.from_prompt("The Eiffel Tower is in", "The Eiffel Tower", "Rome")
    assert r.prompt == "{} is in" and r.text == "The Eiffel Tower is in"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt="{} is in", subject="X", target=""), "target"),
        (dict(prompt="{} is in", subject="", target="Rome"), "subject"),
        (dict(prompt="is in", subject="X", target="Rome"), "prompt"),
        (dict(prompt="{} and {}", subject="X", target="Rome"), "prompt"),
        (dict(prompt="{}", subject="X", target="Rome"), "prompt"),
        (dict(prompt="{} is in", subject=" X", target="Rome"), "subject"),
        (dict(prompt="{} is in", subject="X", target="R" * 201), "target"),
        (dict(prompt="{} is in" + "x" * 600, subject="X", target="Rome"), "prompt"),
        (dict(prompt="{} is in", subject=3, target="Rome"), "subject"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(InvalidEditError) as err:
        EditRequest(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")


def test_subject_missing_from_prompt():
    with pytest.raises(InvalidEditError) as err:
        EditRequest.from_prompt("Paris is nice", "The Eiffel Tower", "Rome")
    assert err.value.field == "subject"
