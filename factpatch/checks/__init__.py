"""Checked commits: a candidate version is scored before it commits (the job's own facts,
earlier edits, protected facts, fluency), and a policy per check decides what a failure does.
The policy (no model) is in :mod:`factpatch.checks.policy`; the scoring, which the worker runs,
in :mod:`factpatch.checks.scoring`."""

from factpatch.checks.policy import (
    CHECKS,
    DEFAULT_POLICY,
    POLICIES,
    CommitRefused,
    FactChecks,
    format_policy,
    parse_policy,
)

__all__ = [
    "CHECKS",
    "DEFAULT_POLICY",
    "POLICIES",
    "CommitRefused",
    "FactChecks",
    "format_policy",
    "parse_policy",
]
