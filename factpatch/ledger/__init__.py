"""The versioned ledger (Redis), the one writer of new versions, and portable snapshots."""

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
