"""The versioned ledger (Redis) and its portable snapshots."""

from factpatch.ledger.ledger import (
    CAUSES,
    Commit,
    CorruptBlobError,
    EditRecord,
    Ledger,
    LedgerError,
    LedgerMismatchError,
    StaleHeadError,
    UnknownEditError,
    UnknownVersionError,
    Version,
)

__all__ = [
    "CAUSES",
    "Commit",
    "CorruptBlobError",
    "EditRecord",
    "Ledger",
    "LedgerError",
    "LedgerMismatchError",
    "StaleHeadError",
    "UnknownEditError",
    "UnknownVersionError",
    "Version",
]
