"""Which version each replica serves: every server reports its own, beside the ledger.

A server writes its replica's state once a second (from its health loop); a reader lists those
seen in the last :data:`STALE_AFTER` seconds, so a killed server drops out by itself.  Entries
older than :data:`FORGET_AFTER` are deleted by the next reader.

Redis layout (beside the ledger's keys, same hash tag)::

    factpatch:{NAME}:replicas   hash   server (host:port) -> {server, version, ready, fault,
                                                              seen, gate}
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from factpatch.ledger.ledger import Ledger

STALE_AFTER = 10.0  # seconds without a report: not listed
FORGET_AFTER = 3600.0  # seconds without a report: deleted


@dataclass(frozen=True)
class ReplicaStatus:
    server: str
    version: int
    ready: bool
    fault: str
    seen: float  # unix seconds
    gate: float | None = None


class ReplicaBoard:
    def __init__(self, ledger: Ledger) -> None:
        self.redis = ledger.redis
        self.key = f"factpatch:{{{ledger.name}}}:replicas"

    def report(self, status: ReplicaStatus) -> None:
        self.redis.hset(self.key, status.server, json.dumps(asdict(status)))

    def remove(self, server: str) -> None:
        self.redis.hdel(self.key, server)

    def list(self, now: float | None = None) -> list[ReplicaStatus]:
        """The replicas seen in the last STALE_AFTER seconds, by server name."""
        now = time.time() if now is None else now
        live, forgotten = [], []
        for server, text in sorted(self.redis.hgetall(self.key).items()):
            entry: dict[str, Any] = json.loads(text)
            age = now - entry["seen"]
            if age > FORGET_AFTER:
                forgotten.append(server)
            elif age <= STALE_AFTER:
                live.append(ReplicaStatus(**entry))
        if forgotten:
            self.redis.hdel(self.key, *forgotten)
        return live
