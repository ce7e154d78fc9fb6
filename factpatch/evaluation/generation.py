"""Measures of the text a model generates about a subject, to judge a fact edit (before/after).

* Fluency: ROME's generation entropy, a weighted mean of the entropies of the text's word
  bigrams and trigrams (Meng et al. 2022, arXiv 2202.05262, appendix: generation entropy).
  An edit that makes the model repeat itself lowers it.
* Degeneracy: a continuation that emits special tokens, repeats one token, or uses very few
  distinct tokens.
* Consistency: the share of continuations of the record's own prompts that mention the answer.
* Essence: whether the model still gives the subject's *other* facts as before the edit.

Generation is one left-padded batch with the KV cache, greedy or top-k sampling from a seeded
``torch.Generator``, so every measure is reproducible.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from factpatch.editing.prompts import continuation, left_pad, pad_batch
from factpatch.runtime.batcher import cache_arg

GENERIC_PROMPTS: tuple[str, ...] = (
    "{} is",
    "The history of {}",
    "{} was born in",
    "{} was founded in",
    "{} is located in",
    "{} is known for",
)

_WORD_RE = re.compile(r"\w+|[^\w\s]")


# --- text measures ----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Words and punctuation marks (a regex stand-in for NLTK's word tokenizer)."""
    return _WORD_RE.findall(text)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _entropy_bits(counts: Counter[tuple[str, ...]]) -> float:
    """-Σ f·log2 f over the relative frequencies f of ``counts`` (0.0 when empty)."""
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(
    text: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
    *,
    fold_case: bool = True,
) -> float:
    """ROME's generation entropy of ``text`` (Meng et al. 2022, arXiv 2202.05262, appendix).

    For each n, H_n = -Σ f·log2 f over the relative frequencies f of the text's word n-grams;
    the result is the mean over n of weight_n·H_n, i.e. (2/3·H2 + 4/3·H3)/2 by default.
    A text with no n-grams scores 0.0.  ``fold_case``: lower-case first (the text measures
    here); the sequential evaluation's figures were taken with case kept, as the reference.
    """
    tokens = _words(text.lower() if fold_case else text)
    parts = [w * _entropy_bits(_ngrams(tokens, n)) for n, w in zip(ns, weights, strict=True)]
    return statistics.fmean(parts) if parts else 0.0


def is_degenerate(
    token_ids: list[int],
    special_ids: set[int],
    *,
    max_run: int = 4,
    min_distinct: float = 0.3,
) -> str | None:
    """Why a continuation (generated ids only, no prompt) is degenerate, or None.

    ``"special"``: it contains a special/control token; ``"repeat"``: one id occurs ``max_run``
    times in a row; ``"low-diversity"``: distinct ids / ids < ``min_distinct`` (8+ ids only).
    """
    if not token_ids:
        return None
    if any(t in special_ids for t in token_ids):
        return "special"
    if _longest_run(token_ids) >= max_run:
        return "repeat"
    if len(token_ids) >= 8 and len(set(token_ids)) / len(token_ids) < min_distinct:
        return "low-diversity"
    return None


def _longest_run(ids: list[int]) -> int:
    longest = run = 0
    for i, t in enumerate(ids):
        run = run + 1 if i and ids[i - 1] == t else 1
        longest = max(longest, run)
    return longest


_CONTROL_RE = re.compile(r"<[^<>\s]+>|\[[a-z_]+\]")


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special, added-special and control tokens, except EOS.

    Control tokens are added tokens written as markup (``<start_of_image>``, ``[multimodal]``):
    Gemma 3's tokenizer does not flag them special.  Added whitespace tokens are text.  A
    continuation that stops at EOS is fine (and generation stops there anyway).
    """
    ids = set(tokenizer.all_special_ids)
    ids |= {
        i
        for i, tok in tokenizer.added_tokens_decoder.items()
        if tok.special or _CONTROL_RE.fullmatch(tok.content)
    }
    ids.discard(tokenizer.eos_token_id)
    return ids


def mentions(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as a whole word (or words), ignoring case."""
    answer = answer.strip()
    if not answer:
        return False
    pattern = re.escape(answer)
    if re.match(r"\w", answer[0]):
        pattern = r"\b" + pattern
    if re.match(r"\w", answer[-1]):
        pattern += r"\b"
    return re.search(pattern, text, re.IGNORECASE) is not None


# --- generation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    prompt: str
    text: str  # continuation only, decoded with skip_special_tokens=False
    token_ids: list[int]  # continuation ids (EOS and anything after it removed)


def _device(model: Any, device: Any) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each column counted over real tokens only (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _choose(logits: torch.Tensor, top_k: list[int], gen: torch.Generator) -> torch.Tensor:
    """Next ids [B] from last-position logits [B, V]: argmax for the rows whose ``top_k`` is 0,
    a top-k softmax sample (one draw from ``gen`` over those rows together) for the others."""
    chosen = logits.argmax(-1)
    sampled = [row for row, k in enumerate(top_k) if k > 0]
    if sampled:
        k = min(top_k[sampled[0]], logits.shape[-1])
        rows = torch.tensor(sampled, device=logits.device)
        values, index = logits[rows].float().topk(k, dim=-1)
        probs = torch.softmax(values, -1).cpu()
        pick = torch.multinomial(probs, 1, generator=gen).to(index.device)
        chosen[rows] = index.gather(-1, pick).squeeze(-1)
    return chosen


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    top_k: int | list[int] = 0,
    seed: int = 0,
    device: Any = None,
) -> list[Generated]:
    """Continue every prompt in one left-padded batch with the KV cache.

    ``top_k=0`` is greedy (the same tokens as generating each prompt alone); ``top_k>0`` samples
    from the softmax over the k best tokens with a generator seeded by ``seed``; a list gives
    each prompt its own (the sampled rows share one k, and draw as if they were a batch of their
    own).  A row stops at the tokenizer's EOS.
    """
    if not prompts:
        return []
    top_k = top_k if isinstance(top_k, list) else [top_k] * len(prompts)
    if len(top_k) != len(prompts) or len({k for k in top_k if k > 0}) > 1:
        raise ValueError("top_k: one value, or one per prompt with a single k > 0")
    dev = _device(model, device)
    eos = tokenizer.eos_token_id
    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]
    ids, mask = left_pad(rows, _pad_id(tokenizer), dev)
    gen = torch.Generator().manual_seed(seed)
    key, cache = cache_arg(model), None
    inputs, positions = ids, _positions(mask)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    steps: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        out = model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{key: cache},
        )
        cache = out[key]
        token = _choose(out.logits[:, -1], top_k, gen)
        token = token.masked_fill(done, _pad_id(tokenizer))
        steps.append(token)
        if eos is not None:
            done |= token == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        inputs, positions = token[:, None], _positions(mask)[:, -1:]
    new = torch.stack(steps, dim=-1).tolist() if steps else [[] for _ in prompts]
    return [_finish(tokenizer, p, row, eos) for p, row in zip(prompts, new, strict=True)]


def _finish(tokenizer: Any, prompt: str, row: list[int], eos: int | None) -> Generated:
    """Cut a generated row at its first EOS and decode it."""
    if eos is not None and eos in row:
        row = row[: row.index(eos)]
    return Generated(prompt, tokenizer.decode(row, skip_special_tokens=False), row)


# --- the report for one CounterFact record ----------------------------------------------------


def subject_prompts(record: dict[str, Any]) -> list[str]:
    """The record's own prompt and paraphrase, then the generic prompts about its subject."""
    own = [record["prompt"], record["rephrase_prompt"]]
    return own + [g.format(record["subject"]) for g in GENERIC_PROMPTS]


@dataclass
class TextReport:
    fluency_greedy: float  # mean ngram_entropy over the greedy continuations
    fluency_sampled: float  # mean over the sampled ones
    degenerate: float  # share (0..1) of all continuations that is_degenerate
    reasons: dict[str, int]  # count per reason
    consistency: float  # share of the own-prompt continuations that mention the answer
    n: int  # number of continuations


def text_report(
    model: Any,
    tokenizer: Any,
    record: dict[str, Any],
    answer: str,
    *,
    max_new_tokens: int = 32,
    top_k: int = 5,
    seed: int = 0,
    device: Any = None,
) -> tuple[TextReport, list[Generated]]:
    """Greedy and top-k sampled continuations of :func:`subject_prompts` and their measures.

    ``answer`` is the object whose mention counts as consistent: the new target after an edit,
    the true one before.  Fluency is scored on the continuations only (not the prompts).  The
    sampled setting (top-5) is ROME's (Meng et al. 2022, appendix).
    """
    prompts = subject_prompts(record)
    kw = dict(max_new_tokens=max_new_tokens, seed=seed, device=device)
    n = len(prompts)  # greedy and sampled in one batch: the head is read once per step
    everything = generate(model, tokenizer, prompts * 2, top_k=[0] * n + [top_k] * n, **kw)
    greedy, sampled = everything[:n], everything[n:]
    special = special_token_ids(tokenizer)
    reasons = Counter(
        r for g in everything if (r := is_degenerate(g.token_ids, special)) is not None
    )
    own = [g for gens in (greedy, sampled) for g in gens[:2]]
    report = TextReport(
        fluency_greedy=statistics.fmean(ngram_entropy(g.text) for g in greedy),
        fluency_sampled=statistics.fmean(ngram_entropy(g.text) for g in sampled),
        degenerate=sum(reasons.values()) / len(everything),
        reasons=dict(reasons),
        consistency=sum(mentions(g.text, answer) for g in own) / len(own),
        n=len(everything),
    )
    return report, everything


# --- essence: the subject's other facts -------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    prompt: str  # full text, e.g. "Michael Jordan was born in"
    answer_id: int  # the unedited model's top-1 next token there
    source: str  # "known" | "generic"


@torch.no_grad()
def _top1(model: Any, tokenizer: Any, prompts: list[str], device: Any = None) -> list[int]:
    """The top-1 next-token id after each prompt, in one right-padded batch."""
    dev = _device(model, device)
    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]
    logits = model(input_ids=pad_batch(rows, _pad_id(tokenizer), dev), use_cache=False).logits
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    return logits[torch.arange(len(rows), device=dev), last].argmax(-1).tolist()


def _excluded(tokenizer: Any, token_id: int, exclude: tuple[str, ...]) -> bool:
    """Whether the answer token starts the first word of an excluded object."""
    piece = tokenizer.decode([token_id]).strip().lower()
    firsts = [e.strip().lower().split()[0] for e in exclude if e.strip()]
    return bool(piece) and any(f.startswith(piece) for f in firsts)


def essence_probes(
    model: Any,
    tokenizer: Any,
    subject: str,
    known: list[dict[str, Any]],
    *,
    exclude: tuple[str, ...] = (),
    device: Any = None,
) -> list[Probe]:
    """Facts about ``subject`` the unedited model gives, to check after an edit.

    ``known`` records (keys subject, prompt, attribute) about the subject become probes when
    the model's top-1 after the prompt is the first token of `` attribute`` (tokenised in
    context); every generic prompt becomes a probe of its own top-1.  Probes whose answer token
    starts the first word of an ``exclude`` entry (the edited relation's objects) are skipped.
    """
    facts = [r for r in known if r["subject"] == subject]
    expected = [_first_answer_id(tokenizer, r["prompt"], r["attribute"]) for r in facts]
    generic = [g.format(subject) for g in GENERIC_PROMPTS]
    texts = [r["prompt"] for r in facts] + generic
    top = _top1(model, tokenizer, texts, device)
    top_known, top_generic = top[: len(facts)], top[len(facts) :]
    candidates = [
        Probe(r["prompt"], want, "known")
        for r, want, got in zip(facts, expected, top_known, strict=True)
        if want == got
    ]
    candidates += [Probe(t, a, "generic") for t, a in zip(generic, top_generic, strict=True)]
    probes: dict[str, Probe] = {}
    for p in candidates:
        if p.prompt not in probes and not _excluded(tokenizer, p.answer_id, exclude):
            probes[p.prompt] = p
    return list(probes.values())


def _first_answer_id(tokenizer: Any, prompt: str, attribute: str) -> int:
    ids, n_prompt = continuation(tokenizer, prompt, attribute)
    return ids[n_prompt]


def essence_kept(
    model: Any, tokenizer: Any, probes: list[Probe], device: Any = None
) -> float | None:
    """Share of ``probes`` whose top-1 next token is still their answer (None if no probes)."""
    if not probes:
        return None
    top = _top1(model, tokenizer, [p.prompt for p in probes], device)
    return sum(t == p.answer_id for t, p in zip(top, probes, strict=True)) / len(probes)
