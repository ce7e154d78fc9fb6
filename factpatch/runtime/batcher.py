"""Continuous batching: one decode loop steps every running sequence of a replica together.

Why not transformers' own continuous-batching manager: it runs its own generation thread with
one generation config for every request (no per-request temperature, top-p, seed or stop), on a
paged cache behind its own attention implementation, and gives no place to take the replica's
read lock per step or to serve each request on its own version.  This scheduler is small and
keeps transformers' ordinary ``DynamicCache``: the batch is one left-padded cache.

Every sequence has a **version**: the one its request named, or the live version when it was
admitted, and keeps it to the end: once the replica's weights move on (a swap between two
steps), its rows get the low-rank difference between the live weights and their version added
to the edited modules' outputs (:mod:`factpatch.runtime.versions`), so its KV cache stays valid
and nothing restarts.  At most ``max_versions`` distinct versions share a batch (a group for
another one waits for rows to leave).

One **global step**, under the replica's read side (a weight swap falls between two steps and
waits for at most one):

1. one forward pass over the last token of every running sequence (attention mask: the left
   padding; position ids: each row's own count of tokens; each row at its version);
2. admit waiting groups (the sequences of one request: a prompt list, ``n``; whole, in order)
   while there is room: their prompts are prefilled together in one left-padded forward pass
   (at most ``prefill_tokens`` padded tokens, so that a step stays short), which gives each its
   first token, and that cache is merged into the batch cache, left-padded to a common length;
3. outside the lock: each sequence samples its next token with its own settings and generator;
   finished ones leave the batch (their cache rows are dropped, and columns that are padding in
   every row are cut).

On a key-gated replica (``--gate``) the rows of another version get the difference of the two
versions' gated changes instead.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from factpatch.editing.prompts import left_pad
from factpatch.models.hooks import thread_hooks
from factpatch.runtime.replica import Replica
from factpatch.runtime.sampling import Sampling, choose
from factpatch.runtime.versions import version_hooks

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One token of one sequence, and the version that produced it."""

    token: int
    version: int
    logits: torch.Tensor | None = None  # [V], when the request asked for log-probabilities


@dataclass(eq=False)
class Sequence:
    ids: list[int]
    sampling: Sampling
    group: Group
    out: queue.SimpleQueue[Step | BaseException | None] = field(default_factory=queue.SimpleQueue)
    generator: torch.Generator = field(default_factory=torch.Generator)
    produced: int = 0
    done: bool = False  # reached EOS or max_new_tokens
    closed: bool = False  # its end (None) was handed out
    cancelled: bool = False  # the caller went away

    def close(self, last: Step | BaseException | None = None) -> None:
        if not self.closed:
            if last is not None:
                self.out.put(last)
            self.out.put(None)
            self.closed = True


@dataclass(eq=False)
class Group:
    sequences: list[Sequence] = field(default_factory=list)
    version: int | None = None  # requested, or the live version once admitted


class Batcher:
    """The decode loop of one replica; :meth:`submit` from any thread."""

    def __init__(
        self,
        replica: Replica,
        max_running: int = 32,
        prefill_tokens: int = 2048,
        max_versions: int = 4,
    ) -> None:
        self.replica = replica
        self.max_running = max_running
        self.prefill_tokens = prefill_tokens  # most padded prompt tokens prefilled in one step
        self.max_versions = max_versions  # most distinct versions in one batch
        self.eos = eos_ids(replica.handle)
        self._cache_arg = cache_arg(replica.handle.model)
        self._waiting: deque[Group] = deque()
        self._rows: list[Sequence] = []  # the batch cache's rows, in order
        self._cache: Any = None  # DynamicCache over the rows, T columns
        self._mask: torch.Tensor | None = None  # [rows, T]: 1 a token, 0 left padding
        self._last: torch.Tensor | None = None  # [rows]: the token each row feeds next
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.steps = 0  # global steps run
        self.largest_batch = 0

    # -- public ------------------------------------------------------------------------------

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def submit(
        self, prompts: list[list[int]], samplings: list[Sampling], version: int | None = None
    ) -> Group:
        """Queue one request's sequences as a group (at ``version``; None: the live one when
        admitted); read each one with :meth:`steps`."""
        group = Group(version=version)
        for ids, s in zip(prompts, samplings, strict=True):
            seq = Sequence(list(ids), s, group)
            seq.generator.manual_seed(s.seed)
            group.sequences.append(seq)
        with self._wake:
            if self._stopping:
                raise RuntimeError("batcher: stopped")
            self._waiting.append(group)
            self._wake.notify_all()
        return group

    @staticmethod
    def steps(seq: Sequence) -> Iterator[Step]:
        """A sequence's steps until it ends; an error of the loop is raised here."""
        while (item := seq.out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    @staticmethod
    def cancel(group: Group) -> None:
        """The caller is gone: its running sequences leave at the next step."""
        for seq in group.sequences:
            seq.cancelled = True

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._rows):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                with self.replica.lock.read():
                    rows = self._step()
                self._hand_out(rows)  # sampling needs no lock
            except Exception as err:  # fail the requests in hand, keep serving the next ones
                log.exception("batcher step failed")
                self._fail_all(err)
        self._fail_all(RuntimeError("batcher: stopped"))

    def _step(self) -> list[tuple[Sequence, torch.Tensor]]:
        """One global step (read side held): (sequence, next-token logits [V]) pairs."""
        live = self.replica.version
        self._remove([s for s in self._rows if s.cancelled])
        rows: list[tuple[Sequence, torch.Tensor]] = []
        if self._rows:
            rows += list(zip(self._rows, self._decode(live), strict=True))
        rows += self._admit(live)
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(self._rows))
        return rows

    def _hand_out(self, rows: list[tuple[Sequence, torch.Tensor]]) -> None:
        """Sample each row's token, hand it out, and let finished sequences go."""
        tokens = []
        for seq, logits in rows:
            token = choose(logits, seq.sampling, seq.generator)
            tokens.append(token)
            wants = seq.sampling.logprobs is not None
            seq.out.put(Step(token, seq.group.version or 0, logits if wants else None))
            seq.produced += 1
            seq.done = token in self.eos or seq.produced >= seq.sampling.max_new_tokens
        if self._rows:
            self._last = torch.tensor(tokens, device=self.replica.handle.device)
        done = [s for s in self._rows if s.done]
        for seq in done:
            seq.close()
        self._remove(done)

    # -- the batch cache ---------------------------------------------------------------------

    def _versions(self, live: int, seqs: list[Sequence]) -> Any:
        """Hooks that put each row at its own version (none while all are at ``live``)."""
        rows = [live if s.group.version is None else s.group.version for s in seqs]
        return thread_hooks(version_hooks(self.replica, live, rows))

    @torch.no_grad()
    def _decode(self, live: int) -> torch.Tensor:
        """One forward pass over every row's last token: logits [rows, V] (float32)."""
        assert self._mask is not None and self._last is not None
        width = self._mask.shape[1]
        positions = self._mask.sum(1, keepdim=True)  # [rows, 1]: each row's own position
        self._mask = F.pad(self._mask, (0, 1), value=1)  # [rows, T + 1]
        with self._versions(live, self._rows):
            out = self.replica.handle.model(
                input_ids=self._last[:, None],
                attention_mask=self._mask,
                position_ids=positions,
                cache_position=torch.tensor([width], device=self._mask.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: self._cache},
            )
        self._cache = out[self._cache_arg]
        return out.logits[:, -1].float()

    @torch.no_grad()
    def _admit(self, live: int) -> list[tuple[Sequence, torch.Tensor]]:
        """Prefill whole waiting groups while there is room, in one left-padded forward pass
        (at most ``prefill_tokens`` rows × length, so that one step stays short); returns
        (sequence, next-token logits) of each admitted sequence."""
        with self._wake:
            room = self.max_running - len(self._rows)
            versions = {s.group.version for s in self._rows}
            longest, ready, kept = 0, [], deque()
            for group in self._waiting:
                going = [s for s in group.sequences if not s.cancelled]
                width = max([longest, *(len(s.ids) for s in going)])
                cost = width * (sum(len(g.sequences) for g in ready) + len(going))
                wanted = live if group.version is None else group.version
                first = not self._rows and not ready  # always make progress
                fits = first or (
                    len(going) <= room
                    and cost <= self.prefill_tokens
                    and len(versions | {wanted}) <= self.max_versions
                )
                if fits and not kept:
                    group.version = wanted
                    versions.add(wanted)
                    ready.append(group)
                    room -= len(going)
                    longest = width
                else:
                    kept.append(group)  # and everything after it: first come, first served
            self._waiting = kept
        seqs = []
        for group in ready:
            for seq in group.sequences:
                if seq.cancelled:
                    seq.close()
                else:
                    seqs.append(seq)
        if not seqs:
            return []
        device = self.replica.handle.device
        ids, mask = left_pad([s.ids for s in seqs], 0, device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # [rows, width]
        with self._versions(live, seqs):
            out = self.replica.handle.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        self._merge(seqs, out[self._cache_arg], mask)
        return list(zip(seqs, out.logits[:, -1].float(), strict=True))

    def _merge(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled rows (``cache``, ``mask`` [new rows, width]) to the batch,
        left-padding whichever side is shorter."""
        last = torch.zeros(len(seqs), dtype=torch.long, device=mask.device)  # set at hand-out
        if not self._rows:
            self._cache, self._mask, self._last, self._rows = cache, mask, last, list(seqs)
            return
        assert self._mask is not None and self._last is not None
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            size = width
            if getattr(old, "is_sliding", False):  # keeps only its window's last tokens
                size = min(width, old.sliding_window - 1)
                old.cumulative_length = width
            old.keys = torch.cat([_left_pad(old.keys, size), _left_pad(new.keys, size)])
            old.values = torch.cat([_left_pad(old.values, size), _left_pad(new.values, size)])
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
        self._last = torch.cat([self._last, last])
        self._rows += seqs

    def _remove(self, leaving: list[Sequence]) -> None:
        """Drop rows; then cut the columns that are padding in every remaining row."""
        if not leaving:
            return
        for seq in leaving:
            if seq.cancelled:
                seq.close()
        keep = [i for i, s in enumerate(self._rows) if s not in leaving]
        if not keep:
            self._clear()
            return
        assert self._mask is not None and self._last is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._last = self._mask[index], self._last[index]
        self._rows = [self._rows[i] for i in keep]
        cut = int((self._mask.cumsum(1) == 0).all(0).sum())
        if cut:
            width = self._mask.shape[1] - cut
            for layer in self._cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.cumulative_length = width
                keep_cols = min(width, layer.keys.shape[-2])
                layer.keys = layer.keys[..., layer.keys.shape[-2] - keep_cols :, :]
                layer.values = layer.values[..., layer.values.shape[-2] - keep_cols :, :]
            self._mask = self._mask[:, cut:]

    def _clear(self) -> None:
        self._cache = self._mask = self._last = None
        self._rows = []

    def _fail_all(self, err: BaseException) -> None:
        """Every running and waiting sequence ends with ``err``."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._rows, *(s for g in waiting for s in g.sequences)]:
            seq.close(err)
        self._clear()


def eos_ids(handle: Any) -> set[int]:
    """The tokens that end a sequence: the generation config's, else the tokenizer's."""
    eos = handle.model.generation_config.eos_token_id
    if eos is None:
        eos = handle.tokenizer.eos_token_id
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def cache_arg(model: torch.nn.Module) -> str:
    """The KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_pad(states: torch.Tensor, size: int) -> torch.Tensor:
    """[rows, heads, t, dim] → [rows, heads, size, dim], zeros on the left (masked out)."""
    return F.pad(states, (0, 0, size - states.shape[-2], 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0), value=0)
