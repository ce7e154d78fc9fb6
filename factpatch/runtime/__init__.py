"""The live runtime: a replica that follows the ledger, and generation on it."""

from factpatch.runtime.generate import (
    Generation,
    Sampling,
    Score,
    StreamEvent,
    generate,
    score,
    stream,
)
from factpatch.runtime.replica import Replica
from factpatch.runtime.rwlock import RWLock

__all__ = [
    "Generation",
    "RWLock",
    "Replica",
    "Sampling",
    "Score",
    "StreamEvent",
    "generate",
    "score",
    "stream",
]
