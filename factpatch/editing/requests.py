"""An edit request: "in `prompt`, `subject` now leads to `target`"; validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MAX_PROMPT_CHARS = 500
MAX_SUBJECT_CHARS = 200
MAX_TARGET_CHARS = 200


class DegenerateEditError(RuntimeError):
    """The computed update is unsafe to apply (it would break the model); nothing was changed."""


class InvalidEditError(ValueError):
    """A request field is malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class EditRequest:
    """``prompt`` is a template with one ``{}`` where the subject goes.

    Use :meth:`from_prompt` for a plain prompt that contains the subject verbatim.
    ``target_true`` (the fact being replaced) is optional and only used for reporting.
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt, MAX_PROMPT_CHARS)
        _check_text("subject", self.subject, MAX_SUBJECT_CHARS)
        _check_text("target", self.target, MAX_TARGET_CHARS)
        if self.prompt.count("{}") != 1:
            raise InvalidEditError("prompt", "must contain the subject placeholder {} exactly once")
        if self.prompt.replace("{}", "").strip() == "":
            raise InvalidEditError("prompt", "has no words besides the subject")
        if self.subject.strip() != self.subject:
            raise InvalidEditError("subject", "must not start or end with whitespace")

    @classmethod
    def from_prompt(
        cls, prompt: str, subject: str, target: str, target_true: str | None = None
    ) -> EditRequest:
        """Build from a prompt that contains ``subject`` (or already has ``{}``)."""
        _check_text("subject", subject, MAX_SUBJECT_CHARS)
        if not isinstance(prompt, str):
            raise InvalidEditError("prompt", "must be a string")
        if "{}" not in prompt:
            if subject not in prompt:
                raise InvalidEditError(
                    "subject", f"{subject!r} does not occur in the prompt {prompt!r}"
                )
            prompt = prompt.replace(subject, "{}", 1)
        return cls(prompt, subject, target, target_true)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_text(field: str, value: object, limit: int) -> None:
    if not isinstance(value, str):
        raise InvalidEditError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidEditError(field, "must not be empty")
    if len(value) > limit:
        raise InvalidEditError(field, f"is {len(value)} characters; the limit is {limit}")
