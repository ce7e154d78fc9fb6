"""The live runtime: a replica that follows the ledger, and generation on it."""

from factpatch.runtime.batcher import Batcher
from factpatch.runtime.generate import (
    Generation,
    Score,
    StreamEvent,
    complete,
    generate,
    score,
    stream,
    stream_all,
)
from factpatch.runtime.replica import Replica
from factpatch.runtime.rwlock import RWLock
from factpatch.runtime.sampling import Sampling, TokenLogprob

__all__ = [
    "Batcher",
    "Generation",
    "RWLock",
    "Replica",
    "Sampling",
    "Score",
    "StreamEvent",
    "TokenLogprob",
    "complete",
    "generate",
    "score",
    "stream",
    "stream_all",
]
