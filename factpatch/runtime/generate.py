"""Generation and scoring on a live replica, each request on exactly one version.

Two paths, the same guarantees (every token of a response comes from the version it names):

* **Batched** (the replica has a :class:`~factpatch.runtime.batcher.Batcher`, as every server
  does by default): the request's sequences join the replica's decode loop as one group, at
  the version the request names or else the live one when admitted, and keep it to the end
  (:mod:`factpatch.runtime.versions`): nothing restarts, a swap waits for one global step.
* **One at a time** (no batcher): a forward pass (one prefill or one decode step) holds the
  read side of the replica's lock, so a weight swap waits at most for the steps already running.
  A request that names a version is served at it whatever is live.  One that does not notes the
  version of its first step; if a later step finds another version live, it restarts from the
  prompt on the new version (its KV cache was computed with the old weights), and after
  ``MAX_RESTARTS`` restarts it holds the read side for its whole length, so it always finishes.
  A stream signals a restart with an event whose ``restart`` is true: the client discards the
  text received so far.  Several sequences of one request (``complete``, ``stream_all``: the
  OpenAI API's ``n`` and prompt lists) come from one version too: ``complete`` runs them again
  when a swap fell between two of them and pins its last attempt; ``stream_all`` cannot take
  back text it has sent, so it holds the read side from its first step to its last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from factpatch.models.hooks import thread_hooks
from factpatch.runtime.batcher import Batcher, cache_arg, eos_ids
from factpatch.runtime.replica import Replica
from factpatch.runtime.sampling import Sampling, TokenLogprob, choose, token_logprob
from factpatch.runtime.versions import version_hooks

MAX_RESTARTS = 3


class VersionChanged(Exception):
    """The live version changed between two steps of one request."""


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    version: int
    finish_reason: str  # "length" | "eos" | "stop"
    prompt_tokens: int
    restarts: int = 0
    completion_tokens: int = 0  # tokens generated, an end-of-sequence token included
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with Sampling.logprobs


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    version: int
    restart: bool = False  # discard everything received before this event
    finish_reason: str | None = None  # set on the last event
    tokens: int = 0  # tokens generated since the previous event
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of those tokens, when asked


@dataclass
class Score:
    logprob: float  # Σ log P(continuation tokens | prompt, earlier tokens)
    token_logprobs: list[float]
    tokens: list[str]
    version: int
    extra: dict = field(default_factory=dict)


def prompt_ids(replica: Replica, prompt: str | list[int]) -> list[int]:
    """Token ids of ``prompt``: a string is tokenized (special tokens such as BOS added, as the
    tokenizer does), a list of ids is taken as it is."""
    if not prompt:
        raise ValueError("prompt: must be non-empty")
    if isinstance(prompt, list):
        vocab = len(replica.handle.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt: token ids must be in 0..{vocab - 1}")
        return list(prompt)
    return list(replica.handle.tokenizer(prompt)["input_ids"])


RawStep = tuple[int, int, TokenLogprob | None]  # (token id, version, its log-prob if asked)


def _direct_steps(
    replica: Replica, ids: list[int], s: Sampling, pinned: bool, wanted: int | None = None
) -> Iterator[RawStep]:
    """One sequence on its own (no batcher): one forward pass per step.

    ``wanted``: serve this version whatever the live one is (its difference added on the fly:
    :mod:`factpatch.runtime.versions`), so a swap changes nothing.  Otherwise the live version:
    ``pinned``, the caller holds the read side for the whole sequence; not pinned, each step
    takes it and VersionChanged is raised when the version moved between two steps."""
    model, device = replica.handle.model, replica.handle.device
    gen = torch.Generator().manual_seed(s.seed)
    inputs = torch.tensor([ids], device=device)  # [1, T] then [1, 1]
    key = cache_arg(model)
    past, version = None, wanted
    for _ in range(s.max_new_tokens):
        with nullcontext() if pinned else replica.lock.read():
            if version is None:
                version = replica.version
            elif replica.version != version and wanted is None:
                raise VersionChanged
            hooks = version_hooks(replica, replica.version, [version])
            with torch.no_grad(), thread_hooks(hooks):
                out = model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{key: past})
        past = out[key]
        logits = out.logits[0, -1]  # [V]
        token = choose(logits, s, gen)
        yield token, version, _logprob(logits, token, s)
        inputs = torch.tensor([[token]], device=device)


def _batched_steps(seq: Any, s: Sampling) -> Iterator[RawStep]:
    """One sequence of a group the batcher runs (at its version to the end: no restarts)."""
    for step in Batcher.steps(seq):
        yield step.token, step.version, _logprob(step.logits, step.token, s)


def _logprob(logits: torch.Tensor | None, token: int, s: Sampling) -> TokenLogprob | None:
    if s.logprobs is None or logits is None:
        return None
    return token_logprob(logits, token, s.logprobs)


@contextmanager
def _sequences(
    replica: Replica,
    ids: list[list[int]],
    samplings: list[Sampling],
    pinned: bool,
    version: int | None = None,
) -> Iterator[list[Iterator[RawStep]]]:
    """The step iterators of one request's sequences, all on one version (``version``, or the
    live one) unless a VersionChanged is raised from one of them.  With the replica's batcher
    they decode together with every other request, each at its version to the end (never a
    VersionChanged); without it one after another (``pinned``: the read side held here, across
    all of them)."""
    if version is not None:
        replica.ledger.get(version)  # UnknownVersionError names the field
    batcher = replica.batcher
    if batcher is None:
        with replica.lock.read() if pinned and version is None else nullcontext():
            yield [
                _direct_steps(replica, one, s, pinned and version is None, version)
                for one, s in zip(ids, samplings, strict=True)
            ]
        return
    group = batcher.submit(ids, samplings, version)
    try:
        yield [_batched_steps(seq, s) for seq, s in zip(group.sequences, samplings, strict=True)]
    finally:
        batcher.cancel(group)  # a caller that stopped early (stop string, client gone)


def _decode(replica: Replica, steps: Iterator[RawStep], s: Sampling) -> Iterator[StreamEvent]:
    """Text events for one attempt of one sequence; the last one carries ``finish_reason``."""
    tok = replica.handle.tokenizer
    eos = eos_ids(replica.handle)
    hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may be forming
    out: list[int] = []
    sent, version, finish, pending = 0, replica.version, "length", 0
    logprobs: list[TokenLogprob] = []
    for token, version, logprob in steps:
        pending += 1
        if token in eos:
            finish = "eos"
            break
        out.append(token)
        if logprob is not None:
            logprobs.append(logprob)
        text = tok.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        ready = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            ready = min(ready, len(text) - 1)
        if ready > sent:
            yield StreamEvent(text[sent:ready], version, tokens=pending, logprobs=logprobs)
            sent, pending, logprobs = ready, 0, []
    else:
        text = tok.decode(out, skip_special_tokens=True)
    if finish == "eos":
        text = tok.decode(out, skip_special_tokens=True)
    yield StreamEvent(text[sent:], version, finish_reason=finish, tokens=pending, logprobs=logprobs)


def stream(
    replica: Replica,
    prompt: str | list[int],
    s: Sampling | None = None,
    version: int | None = None,
) -> Iterator[StreamEvent]:
    """Text as it is generated (at ``version``; None: the live one); see the module docstring
    for ``restart`` events."""
    s = s or Sampling()
    ids = prompt_ids(replica, prompt)
    restart = False
    for attempt in range(MAX_RESTARTS + 1):
        try:
            pinned = attempt == MAX_RESTARTS
            with _sequences(replica, [ids], [s], pinned, version) as (steps,):
                for event in _decode(replica, steps, s):
                    event.restart, restart = restart, False
                    yield event
            return
        except VersionChanged:
            restart = True  # the next event tells the client to drop what it has


def stream_all(
    replica: Replica,
    prompts: list[str | list[int]],
    samplings: list[Sampling],
    version: int | None = None,
) -> Iterator[tuple[int, StreamEvent]]:
    """(sequence index, event) for several sequences, all from one version and pinned from the
    first step to the last (nothing sent is ever taken back); one sequence's events after
    another's."""
    ids = [prompt_ids(replica, p) for p in prompts]
    with _sequences(replica, ids, samplings, True, version) as steps:
        for index, (one, s) in enumerate(zip(steps, samplings, strict=True)):
            for event in _decode(replica, one, s):
                yield index, event


def _collect(
    replica: Replica,
    steps: Iterator[RawStep],
    s: Sampling,
    n_prompt: int,
    check: Callable[[], None],
) -> Generation:
    parts: list[str] = []
    tokens, logprobs, event = 0, [], None
    for event in _decode(replica, steps, s):
        check()
        parts.append(event.text)
        tokens += event.tokens
        logprobs += event.logprobs
    assert event is not None and event.finish_reason is not None
    text = "".join(parts)
    token_ids = replica.handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Generation(
        text,
        list(token_ids),
        event.version,
        event.finish_reason,
        n_prompt,
        completion_tokens=tokens,
        logprobs=logprobs,
    )


def complete(
    replica: Replica,
    prompts: list[str | list[int]],
    samplings: list[Sampling],
    check: Callable[[], None] = lambda: None,
    version: int | None = None,
) -> list[Generation]:
    """Several whole completions, all from one version.  ``check`` runs after every text event
    (a deadline, say: an exception it raises ends the request)."""
    ids = [prompt_ids(replica, p) for p in prompts]
    for attempt in range(MAX_RESTARTS + 1):
        try:
            pinned = attempt == MAX_RESTARTS
            with _sequences(replica, ids, samplings, pinned, version) as steps:
                results = [
                    _collect(replica, one, s, len(p), check)
                    for one, s, p in zip(steps, samplings, ids, strict=True)
                ]
        except VersionChanged:
            continue
        if len({r.version for r in results}) == 1:  # no swap between two sequences either
            for r in results:
                r.restarts = attempt
            return results
    raise AssertionError("unreachable: the last attempt is pinned")


def generate(
    replica: Replica,
    prompt: str | list[int],
    s: Sampling | None = None,
    version: int | None = None,
) -> Generation:
    """The whole completion, all of it from one version (named in the result; ``version``:
    that one, else the live one)."""
    return complete(replica, [prompt], [s or Sampling()], version=version)[0]


@torch.no_grad()
def score(replica: Replica, prompt: str, continuation: str, version: int | None = None) -> Score:
    """log P(``continuation`` | ``prompt``), the two strings joined as given (no space added),
    at ``version`` (None: the live one)."""
    if not prompt:
        raise ValueError("prompt: must be non-empty")
    if not continuation:
        raise ValueError("continuation: must be non-empty")
    tok = replica.handle.tokenizer
    enc = tok(prompt + continuation, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = sum(1 for start, _ in offsets if start < len(prompt))  # specials: (0, 0)
    if n_prompt == len(ids):
        raise ValueError("continuation: produced no token after the prompt")
    if n_prompt == 0:
        raise ValueError("prompt: produced no token")
    inputs = torch.tensor([ids], device=replica.handle.device)
    if version is not None:
        replica.ledger.get(version)  # UnknownVersionError names the field
    with replica.lock.read():
        version = replica.version if version is None else version
        with thread_hooks(version_hooks(replica, replica.version, [version])):
            logits = replica.handle.model(input_ids=inputs, use_cache=False).logits
    log_probs = torch.log_softmax(logits[0, n_prompt - 1 : -1].float(), -1)  # [n_cont, V]
    targets = torch.tensor(ids[n_prompt:], device=log_probs.device)
    token_lp = log_probs.gather(1, targets[:, None])[:, 0].tolist()
    return Score(float(sum(token_lp)), token_lp, [tok.decode([t]) for t in ids[n_prompt:]], version)
