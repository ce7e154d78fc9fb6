"""The editing engine: ROME deltas computed purely, applied or materialised separately."""

from factpatch.editing.delta import Delta, apply_delta, base_weights, load_weights, materialize
from factpatch.editing.hparams import RomeHParams, default_hparams
from factpatch.editing.requests import EditRequest, InvalidEditError
from factpatch.editing.rome import DegenerateEditError, compute_edit

__all__ = [
    "DegenerateEditError",
    "Delta",
    "EditRequest",
    "InvalidEditError",
    "RomeHParams",
    "apply_delta",
    "base_weights",
    "compute_edit",
    "default_hparams",
    "load_weights",
    "materialize",
]
