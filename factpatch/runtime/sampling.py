"""Sampling settings and the choice of the next token from one row's logits, shared by the
one-at-a-time path (:mod:`factpatch.runtime.generate`) and the batched one
(:mod:`factpatch.runtime.batcher`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k ≥ 0: each token's log-probability + top k

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
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs: must be ≥ 0")


@dataclass
class TokenLogprob:
    """One generated token: its log-probability under the model (before temperature, top-k and
    top-p), and the ``Sampling.logprobs`` most probable tokens with theirs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def choose(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
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


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    log_probs = torch.log_softmax(logits.float(), -1)  # [V]
    top = log_probs.topk(k) if k else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenLogprob(token, float(log_probs[token]), pairs)
