"""A live model replica that follows the ledger.

Applying a version (``Replica.apply``):

1. read the version record and its deltas (each checked against its content address);
2. materialise ``base + Σ active deltas`` for every touched module off to the side, from the
   replica's copies of the base tensors (float32 accumulation in ledger order, one cast);
3. check every tensor's sha256 against the record — on a mismatch the replica keeps its current
   weights, records the fault and reports not ready;
4. take the write side of the replica's read/write lock (no forward pass runs while it is held;
   forward passes hold the read side for one step each) and copy the new tensors into the live
   parameters in place, then set ``version``.  Only this step blocks inference;
5. hash the live tensors again.

Because every version is materialised from the base, never by subtracting, any replica at
version N holds bit-identical tensors, whatever path it took to N.

A replica made with ``gate`` τ serves the same versions through key gates
(:mod:`factpatch.editing.gate`): steps 1–3 are unchanged (the materialised tensors still prove
the deltas are the ledger's), but step 4 keeps the base tensors live and swaps, under the same
write lock, the gate each edited module's forward hook applies — ``g(k)·ΔW k`` with the
version's active deltas — so a rollback is again exact: base tensors (checked against their
hashes) and the gates of the older version's deltas.  Each edited layer's covariance C is the
one its first delta was solved with (from the disk cache the worker filled, or computed once).

A replica catches up on start (straight to the head) and then follows the ledger: it listens on
the ledger's Redis channel and also checks the head every ``poll_interval`` seconds, so a missed
message delays an update by at most that long and never loses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis
import torch

from factpatch.editing.covariance import layer_covariances
from factpatch.editing.delta import Delta, load_weights, materialize
from factpatch.editing.gate import KeyGate, whitener
from factpatch.ledger import Ledger, LedgerError, LedgerMismatchError
from factpatch.models.loading import ModelHandle, tensor_sha256, weights_hash
from factpatch.runtime.rwlock import RWLock

log = logging.getLogger(__name__)


class _GateSlot:
    """A module's forward hook whose :class:`KeyGate` is swapped under the write lock
    (None: the module's own output)."""

    def __init__(self) -> None:
        self.gate: KeyGate | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor):
        return output if self.gate is None else self.gate(module, args, output)


class Replica:
    def __init__(self, handle: ModelHandle, ledger: Ledger, gate: float | None = None) -> None:
        self.handle = handle
        self.ledger = ledger
        self.gate = gate  # τ: serve edits behind key gates; None: in the weights
        self._slots: dict[str, _GateSlot] = {}
        self._whiteners: dict[str, torch.Tensor] = {}  # path -> whitener(C), computed once
        self._version_gates: dict[int, dict[str, KeyGate]] = {}  # gates_for's cache
        self.lock = RWLock()
        # The continuous-batching decode loop (runtime.batcher.Batcher) when serving; None:
        # requests decode one at a time (runtime.generate).
        self.batcher: Any = None
        self.diffs: dict[tuple[int, int], Any] = {}  # runtime.versions.version_diff's cache
        self.diffs_lock = threading.Lock()
        self.version = 0
        self.fault: str | None = None
        self.started = False
        self.base: dict[str, torch.Tensor] = {}  # copies of only the base tensors edits touch
        # Per apply: (version, seconds waiting for running forward steps, seconds the write lock
        # was held).  New steps queue during both; only the second is the copy itself.
        self.applies: deque[tuple[int, float, float]] = deque(maxlen=10_000)
        self.on_apply: list[Callable[[int, float, float], None]] = []
        self.on_fault: list[Callable[[str], None]] = []  # a version refused, and why
        self._deltas: dict[str, Delta] = {}
        # The tensors hashes_for materialised last, kept for the apply that follows a commit:
        # (edit ids, paths) -> tensors.  One materialisation per commit.
        self._materialised: tuple[tuple[tuple[str, ...], frozenset[str]], dict] | None = None
        self._apply_mutex = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Serving the ledger's weights: started, caught up once, and no hash/blob fault."""
        return self.started and self.fault is None

    def start(self) -> Replica:
        """Check that the live weights are the base weights and that the ledger's version 0
        names them (or create version 0), then catch up to the head.

        The weights are hashed again here, not taken from the handle: a replica whose model was
        already changed (say, copied from a live, edited model) would otherwise take edited
        tensors for base tensors and materialise every later version wrongly.
        """
        actual = weights_hash(self.handle.model)
        if actual != self.handle.base_hash:
            raise LedgerMismatchError(
                f"model weights hash {actual[:16]} is not the base {self.handle.base_hash[:16]}: "
                "a replica must start from unedited weights"
            )
        self.ledger.init(self.handle.base_hash, self.handle.name)
        self.catch_up()
        self.started = True
        return self

    def catch_up(self) -> int:
        head = self.ledger.head()
        if head != self.version or self.fault is not None:
            self.apply(head)
        return self.version

    # -- materialisation ---------------------------------------------------------------------

    def delta(self, edit_id: str) -> Delta:
        if edit_id not in self._deltas:
            self._deltas[edit_id] = self.ledger.delta(edit_id)  # verified against its id
        return self._deltas[edit_id]

    def weights_for(self, edits: Sequence[str], paths: set[str]) -> dict:
        """Materialised tensors of ``paths`` ∪ every module the edits touch."""
        return self._materialise(edits, paths)[1]

    def hashes_for(self, edits: Sequence[str], paths: set[str]) -> dict[str, str]:
        """sha256 of each materialised tensor (what a commit records); the tensors are kept
        until the next apply, which then copies them instead of materialising again."""
        with self._apply_mutex:  # self.base grows only under this mutex
            self._materialised = self._materialise(edits, paths)
            return {p: tensor_sha256(w) for p, w in self._materialised[1].items()}

    def _materialise(
        self, edits: Sequence[str], paths: set[str]
    ) -> tuple[tuple[tuple[str, ...], frozenset[str]], dict]:
        deltas = [self.delta(e) for e in edits]
        paths = set(paths) | {p for d in deltas for p in d.factors} | set(self.base)
        key = (tuple(edits), frozenset(paths))
        if self._materialised is not None and self._materialised[0] == key:
            return self._materialised  # hashed for a commit a moment ago
        for path in sorted(paths - set(self.base)):
            # Never written before (a module enters self.base before its first write), so the
            # live tensor is still the base tensor.
            self.base[path] = self.handle.module(path).weight.detach().clone()
        return key, materialize(self.handle, {p: self.base[p] for p in paths}, deltas)

    # -- applying ----------------------------------------------------------------------------

    def apply(self, number: int) -> bool:
        """Make version ``number`` live; False (and ``fault`` set) if it fails verification."""
        with self._apply_mutex:
            record = self.ledger.get(number)
            try:
                weights = self.weights_for(record.edits, set(record.hashes))
            except LedgerError as err:
                return self._refuse(number, str(err))
            finally:
                self._materialised = None
            bad = [p for p, h in record.hashes.items() if tensor_sha256(weights[p]) != h]
            if bad:
                return self._refuse(number, f"materialised weights do not match hashes of {bad}")
            expected = record.hashes
            gates: dict[str, KeyGate] = {}
            if self.gate is not None:
                deltas = [self.delta(e) for e in record.edits]
                gates = self._gates(deltas)
                weights = {p: self.base[p] for p in weights}
                expected = {p: tensor_sha256(self.base[p]) for p in record.hashes}
            t_ask = time.perf_counter()
            with self.lock.write():
                t_held = time.perf_counter()
                load_weights(self.handle, weights)
                for path in set(self._slots) | set(gates):
                    self._slot(path).gate = gates.get(path)
                self.version = number
                t_done = time.perf_counter()
            live = {p: tensor_sha256(self.handle.module(p).weight) for p in record.hashes}
            if live != expected:
                return self._refuse(number, "live weights do not match the ledger after the copy")
            self.fault = None
            self.applies.append((number, t_held - t_ask, t_done - t_held))
            for callback in self.on_apply:
                callback(number, t_held - t_ask, t_done - t_held)
            log.info(
                "version %d live (%d edits; blocked %.2f ms, waited %.2f ms for passes)",
                number,
                len(record.edits),
                1e3 * (t_done - t_held),
                1e3 * (t_held - t_ask),
            )
            return True

    def gates_for(self, number: int) -> dict[str, KeyGate]:
        """The key gates of version ``number`` (gated replicas; built as ``apply`` builds them,
        cached): what a request that names this version is served through."""
        with self.diffs_lock:  # the batcher and request threads share the cache
            if number not in self._version_gates:
                deltas = [self.delta(e) for e in self.ledger.get(number).edits]
                self._version_gates[number] = self._gates(deltas)
                while len(self._version_gates) > 16:
                    self._version_gates.pop(next(iter(self._version_gates)))
            return self._version_gates[number]

    def _gates(self, deltas: list[Delta]) -> dict[str, KeyGate]:
        """The key gate of every module ``deltas`` change (``self.gate`` τ)."""
        gates = {}
        for path in sorted({p for d in deltas for p in d.factors}):
            if path not in self._whiteners:
                first = next(d for d in deltas if path in d.factors)
                layer = next(
                    j
                    for j in range(self.handle.n_layers)
                    if self.handle.adapter.rewrite_path(j) == path
                )
                n_tokens = first.provenance["hparams"]["cov_tokens"]
                stats = layer_covariances(self.handle, [layer], n_tokens)[layer]
                self._whiteners[path] = whitener(stats.cov)
            weight = self.handle.module(path).weight
            gates[path] = KeyGate.build(deltas, path, self._whiteners[path], self.gate, weight)
        return gates

    def _slot(self, path: str) -> _GateSlot:
        """The gate hook of ``path``, registered on first use (write lock held)."""
        if path not in self._slots:
            self._slots[path] = _GateSlot()
            self.handle.module(path).register_forward_hook(self._slots[path])
        return self._slots[path]

    def _refuse(self, number: int, reason: str) -> bool:
        fault = f"version {number}: {reason}"
        if fault != self.fault:  # report each refused version once, not at every poll
            log.error("refusing %s", fault)
            for callback in self.on_fault:
                callback(fault)
        self.fault = fault
        return False

    # -- following ---------------------------------------------------------------------------

    def follow(self, poll_interval: float = 1.0) -> threading.Thread:
        """Follow the ledger in a daemon thread (pub/sub wake-ups plus a periodic check)."""
        self._stop.clear()
        self._follower = threading.Thread(
            target=self._follow_loop, args=(poll_interval,), name="replica-follow", daemon=True
        )
        self._follower.start()
        return self._follower

    def stop(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
            self._follower = None

    def _follow_loop(self, poll_interval: float) -> None:
        pubsub: Any = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.ledger.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.ledger.channel)
                pubsub.get_message(timeout=poll_interval)  # a new head, or the poll tick
                self.catch_up()
            except (redis.RedisError, OSError) as err:
                log.warning("ledger unreachable (%s); serving version %d", err, self.version)
                pubsub = None
                self._stop.wait(poll_interval)
            except LedgerError as err:
                log.error("ledger error while following: %s", err)
                self._stop.wait(poll_interval)
        if pubsub is not None:
            pubsub.close()
