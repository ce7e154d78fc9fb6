"""Generation and scoring on a live replica, each request on exactly one version.

A forward pass (one prefill or one decode step) holds the read side of the replica's lock, so
a weight swap waits at most for the steps already running and blocks new steps only for the
copy itself.  A request notes the version of its first step; if a later step finds another
version live, the request is restarted from the prompt on the new version (its KV cache was
computed with the old weights).  After ``MAX_RESTARTS`` restarts it holds the read side for its
whole length instead, so it always finishes.  Either way every token of a response comes from
the version the response names.  A stream signals a restart with an event whose ``restart`` is
true: the client discards the text received so far.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from factpatch.runtime.replica import Replica

MAX_RESTARTS = 3


class VersionChanged(Exception):
    """The live version changed between two steps of one request."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be ≥ 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError("temperature: must be a finite number ≥ 0")
        if self.top_k < 0:
            raise ValueError("top_k: must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p: must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    version: int
    finish_reason: str  # "length" | "eos" | "stop"
    prompt_tokens: int
    restarts: int = 0


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    version: int
    restart: bool = False  # discard everything received before this event
    finish_reason: str | None = None  # set on the last event
    tokens: int = 0  # tokens generated since the previous event


@dataclass
class Score:
    logprob: float  # Σ log P(continuation tokens | prompt, earlier tokens)
    token_logprobs: list[float]
    tokens: list[str]
    version: int
    extra: dict = field(default_factory=dict)


def prompt_ids(replica: Replica, prompt: str) -> list[int]:
    if not prompt:
        raise ValueError("prompt: must be non-empty")
    return list(replica.handle.tokenizer(prompt)["input_ids"])


def _choose(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """Next token from the last position's logits [V]."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if s.top_p < 1:
        probs, order = torch.softmax(logits, -1).sort(descending=True)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = -math.inf
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))


def _steps(
    replica: Replica, ids: list[int], s: Sampling, pinned: bool
) -> Iterator[tuple[int, int]]:
    """Yield (token id, version) per step; raises VersionChanged unless ``pinned``."""
    model, device = replica.handle.model, replica.handle.device
    gen = torch.Generator().manual_seed(s.seed)
    inputs = torch.tensor([ids], device=device)  # [1, T] then [1, 1]
    cache_arg = _cache_arg(model)
    past, version = None, None
    with replica.lock.read() if pinned else nullcontext():
        for _ in range(s.max_new_tokens):
            with nullcontext() if pinned else replica.lock.read():
                if version is None:
                    version = replica.version
                elif replica.version != version:
                    raise VersionChanged
                with torch.no_grad():
                    out = model(
                        input_ids=inputs, use_cache=True, logits_to_keep=1, **{cache_arg: past}
                    )
            past = out[cache_arg]
            token = _choose(out.logits[0, -1], s, gen)
            yield token, version
            inputs = torch.tensor([[token]], device=device)


def _cache_arg(model: torch.nn.Module) -> str:
    """The KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode(replica: Replica, ids: list[int], s: Sampling, pinned: bool) -> Iterator[StreamEvent]:
    """Text events for one attempt; the last one carries ``finish_reason``."""
    tok = replica.handle.tokenizer
    eos = set(_eos_ids(replica))
    hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may be forming
    out: list[int] = []
    sent, version, finish, pending = 0, replica.version, "length", 0
    for token, version in _steps(replica, ids, s, pinned):
        pending += 1
        if token in eos:
            finish = "eos"
            break
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        ready = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            ready = min(ready, len(text) - 1)
        if ready > sent:
            yield StreamEvent(text[sent:ready], version, tokens=pending)
            sent, pending = ready, 0
    else:
        text = tok.decode(out, skip_special_tokens=True)
    if finish == "eos":
        text = tok.decode(out, skip_special_tokens=True)
    yield StreamEvent(text[sent:], version, finish_reason=finish, tokens=pending)


def _eos_ids(replica: Replica) -> list[int]:
    eos = replica.handle.model.generation_config.eos_token_id
    if eos is None:
        eos = replica.handle.tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def stream(replica: Replica, prompt: str, s: Sampling | None = None) -> Iterator[StreamEvent]:
    """Text as it is generated; see the module docstring for ``restart`` events."""
    s = s or Sampling()
    ids = prompt_ids(replica, prompt)
    restart = False
    for attempt in range(MAX_RESTARTS + 1):
        try:
            for event in _decode(replica, ids, s, pinned=attempt == MAX_RESTARTS):
                event.restart, restart = restart, False
                yield event
            return
        except VersionChanged:
            restart = True  # the next event tells the client to drop what it has


def generate(replica: Replica, prompt: str, s: Sampling | None = None) -> Generation:
    """The whole completion, all of it from one version (named in the result)."""
    s = s or Sampling()
    ids = prompt_ids(replica, prompt)
    for attempt in range(MAX_RESTARTS + 1):
        try:
            parts, event = [], None
            for event in _decode(replica, ids, s, pinned=attempt == MAX_RESTARTS):
                parts.append(event.text)
            assert event is not None and event.finish_reason is not None
            text = "".join(parts)
            token_ids = replica.handle.tokenizer(text, add_special_tokens=False)["input_ids"]
            return Generation(
                text, list(token_ids), event.version, event.finish_reason, len(ids), attempt
            )
        except VersionChanged:
            continue
    raise AssertionError("unreachable: the last attempt is pinned")


@torch.no_grad()
def score(replica: Replica, prompt: str, continuation: str) -> Score:
    """log P(``continuation`` | ``prompt``), the two strings joined as given (no space added)."""
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
    with replica.lock.read():
        version = replica.version
        logits = replica.handle.model(input_ids=inputs, use_cache=False).logits
    log_probs = torch.log_softmax(logits[0, n_prompt - 1 : -1].float(), -1)  # [n_cont, V]
    targets = torch.tensor(ids[n_prompt:], device=log_probs.device)
    token_lp = log_probs.gather(1, targets[:, None])[:, 0].tolist()
    return Score(float(sum(token_lp)), token_lp, [tok.decode([t]) for t in ids[n_prompt:]], version)
