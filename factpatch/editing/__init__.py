"""The editing engine: ROME and MEMIT/AlphaEdit deltas computed purely, applied or materialised
separately."""

from factpatch.editing.delta import Delta, apply_delta, base_weights, load_weights, materialize
from factpatch.editing.hparams import (
    MemitHParams,
    RomeHParams,
    default_hparams,
    default_memit_hparams,
)
from factpatch.editing.memit import SequentialState, compute_alphaedit, compute_memit
from factpatch.editing.methods import METHODS, check_method, compute_delta
from factpatch.editing.requests import DegenerateEditError, EditRequest, InvalidEditError
from factpatch.editing.rome import compute_edit

__all__ = [
    "METHODS",
    "DegenerateEditError",
    "Delta",
    "EditRequest",
    "InvalidEditError",
    "MemitHParams",
    "RomeHParams",
    "SequentialState",
    "apply_delta",
    "base_weights",
    "check_method",
    "compute_alphaedit",
    "compute_delta",
    "compute_edit",
    "compute_memit",
    "default_hparams",
    "default_memit_hparams",
    "load_weights",
    "materialize",
]
