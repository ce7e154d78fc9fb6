"""Tokenise prompts and find the positions an edit needs.

Positions come from the tokenizer's character offsets, never from tokenising pieces separately:
that way a begin-of-sequence token, or a subject merged with its neighbour into one token,
cannot shift an index.  A target is tokenised in context (``prompt + " " + target``) and split
at the prompt's last character, which is how P(target | prompt) is defined in the CounterFact
metrics (Meng et al. 2022, appendix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prompt ids followed by target ids (if any)
    subject_last: int  # index of the subject's last token
    n_prompt: int  # number of prompt tokens (BOS included)

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.n_prompt :]


def encode(
    tokenizer: Any, template: str, subject: str, target: str | None = None, prefix: str = ""
) -> Encoded:
    """Encode ``prefix + template`` with ``{}`` replaced by ``subject``, then `` target``."""
    at = template.index("{}")
    prompt = prefix + template.replace("{}", subject, 1)
    start = len(prefix) + at
    end = start + len(subject)
    text = prompt if target is None else f"{prompt} {target}"
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Special tokens carry the empty span (0, 0); a real token spans at least one character.
    subject_tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not subject_tokens:
        raise ValueError(f"subject {subject!r} produced no token in {prompt!r}")
    n_prompt = len(ids) if target is None else sum(1 for s, _ in offsets if s < len(prompt))
    if target is not None and n_prompt == len(ids):
        raise ValueError(f"target {target!r} produced no token after {prompt!r}")
    return Encoded(list(ids), subject_tokens[-1], n_prompt)


def continuation(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """Ids of ``prompt + " " + target`` and the number of prompt tokens among them."""
    enc = tokenizer(f"{prompt} {target}", return_offsets_mapping=True)
    n_prompt = sum(1 for s, _ in enc["offset_mapping"] if s < len(prompt))
    if n_prompt == len(enc["input_ids"]):
        raise ValueError(f"target {target!r} produced no token after {prompt!r}")
    return list(enc["input_ids"]), n_prompt


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], device: torch.device
) -> list[float]:
    """Mean per-token log-probability of each ``target`` after its ``prompt``, in one batch."""
    encoded = [continuation(tokenizer, prompt, target) for prompt, target in pairs]
    ids = pad_batch([e[0] for e in encoded], tokenizer.pad_token_id, device)
    log_probs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    out = []
    for row, (seq, n_prompt) in enumerate(encoded):
        targets = torch.tensor(seq[n_prompt:], device=device)
        positions = torch.arange(n_prompt - 1, len(seq) - 1, device=device)
        out.append(float(log_probs[row, positions, targets].mean()))
    return out


def pad_batch(sequences: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-pad to one [B, T] tensor.

    Right padding needs no attention mask for a causal LM: a real token only attends to earlier
    positions, which are all real.  Outputs at padded positions are never read.
    """
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return batch.to(device)


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to [B, T] ids and their attention mask (1 on real tokens), each row
    right-aligned so that every row's next token is predicted at the last column: what batched
    generation needs.  Pass position ids counted over real tokens (mask.cumsum − 1)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)
