"""Causal tracing: where a model computes a fact (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", section 2).

Three kinds of run of one prompt:

- clean: the prompt as is.  P_clean = P(answer's first token) at the last position;
- corrupted: Gaussian noise added to the subject tokens' embeddings (the output of the adapter's
  ``embed`` module), ``samples`` seeded draws.  P_corrupted = the mean over the draws;
- restored: a corrupted run in which some internal outputs at one token are put back to their
  clean values.  Its indirect effect is IE = P_restored − P_corrupted (mean over the draws).

``kind="hidden"`` restores one block output (token t, layer l).  ``"mlp"`` and ``"attn"`` restore
that sublayer's output at token t in a window of ``window`` consecutive layers around l,
[l − ⌊window/2⌋, l + ⌈window/2⌉) clipped at the ends, as in the paper's reference code.

How the restorations are computed (every step is exact; the tests compare the result with
``tests/reference_trace.py``, one plain forward per restoration):

- batched: one batch holds ``samples`` rows (one per noise draw, the same draws for every site)
  for each of many (token, layer) sites of any kinds at one token t;
- a site at token t changes nothing before t (causal attention), so positions 0…t−1 are run once,
  corrupted, into a key/value cache that grows one token per t, and only positions t… are run
  per site;
- a site changes nothing below its first restored layer, so its rows join the batch at that
  block, from the corrupted run's input to it, and run only the blocks above; the blocks are
  called with the arguments (masks, position embeddings) recorded from a one-row run;
- positions before the first subject token are the same in the clean and the corrupted run, so
  restoring them has an effect of exactly 0 and they are not run;
- the LM head is applied to the last position only, on a contiguous [rows, d] tensor.

Hooks are thread-private and removed on exit (``thread_hooks``); no weight is written.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

from factpatch.editing.prompts import continuation
from factpatch.models.hooks import HookFn, StopForward, block_output, run_until_stop, thread_hooks
from factpatch.models.loading import ModelHandle
from factpatch.tracing.noise import draw_noise, noise_level

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
HEAD_ROWS = 256  # rows per LM-head matmul: bounds the [rows, vocab] logits tensor (256 MiB)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class TracePrompt:
    text: str
    ids: list[int]
    subject: tuple[int, int]  # subject token range [start, end)


def encode_prompt(tokenizer: Any, prompt: str, subject: str) -> TracePrompt:
    """Tokenise ``prompt`` (the full text, or a template with ``{}`` for the subject) and find
    the subject's tokens from the character offsets, as ``factpatch.editing.prompts.encode``
    does (that function returns only the last subject token; tracing needs the whole range)."""
    if not subject or not subject.strip():
        raise ValueError("subject: must be a non-empty string")
    text = prompt.replace("{}", subject, 1) if "{}" in prompt else prompt
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject: {subject!r} does not occur in the prompt {text!r}")
    end = start + len(subject)
    enc = tokenizer(text, return_offsets_mapping=True)
    # Special tokens carry the empty span (0, 0); a real token spans at least one character.
    offsets = enc["offset_mapping"]
    tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not tokens:
        raise ValueError(f"subject: {subject!r} produced no token in {text!r}")
    return TracePrompt(text, list(enc["input_ids"]), (tokens[0], tokens[-1] + 1))


def answer_token(tokenizer: Any, text: str, answer: str) -> int:
    """The first token of ``answer`` after ``text``, tokenised in context (text + " " + answer)."""
    if not answer or not answer.strip():
        raise ValueError("answer: must be a non-empty string (or None for the greedy token)")
    try:
        ids, n_prompt = continuation(tokenizer, text, answer.strip())
    except ValueError as err:
        raise ValueError(f"answer: {err}") from err
    return ids[n_prompt]


def window_layers(layer: int, n_layers: int, window: int) -> tuple[int, ...]:
    """[layer − ⌊window/2⌋, layer + ⌈window/2⌉) clipped to the model (the reference's window)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


@dataclass(frozen=True)
class Site:
    """What one restored run puts back: the ``kind`` outputs at ``token`` in ``layers``."""

    kind: str
    token: int
    layers: tuple[int, ...]


def sites_for(kind: str, n_tokens: int, n_layers: int, window: int, first: int = 0) -> list[Site]:
    """One site per (token ≥ first, layer), tokens outer: the cells of a trace's matrix."""
    span = 1 if kind == "hidden" else window
    return [
        Site(kind, token, window_layers(layer, n_layers, span))
        for token in range(first, n_tokens)
        for layer in range(n_layers)
    ]


def module_path(handle: ModelHandle, kind: str, layer: int) -> str:
    adapter = handle.adapter
    paths = {"hidden": adapter.block_path, "mlp": adapter.mlp_path, "attn": adapter.attn_path}
    return paths[kind](layer)


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(eq=False)
class TraceResult:
    """One causal trace.  ``matrix[t, l]`` is the indirect effect of restoring the ``kind``
    state(s) of token t at layer l (window centred on l for mlp/attn): P_restored − P_corrupted."""

    prompt: str
    subject: str
    answer: str  # the decoded answer token, e.g. " Paris"
    answer_id: int
    kind: str
    tokens: list[str]
    layers: list[int]
    subject_range: tuple[int, int]  # token range [start, end)
    clean: float  # P(answer) in the clean run
    corrupted: float  # mean P(answer) over the corrupted runs
    matrix: torch.Tensor  # [tokens, layers] float32 indirect effects
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def restored(self) -> torch.Tensor:  # [tokens, layers] P(answer) after restoring
        return self.matrix + self.corrupted

    def strongest(self) -> tuple[int, int]:
        """(token, layer) of the largest indirect effect."""
        flat = int(self.matrix.argmax())
        return divmod(flat, self.matrix.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "answer_id": self.answer_id,
            "kind": self.kind,
            "tokens": self.tokens,
            "layers": self.layers,
            "subject_range": list(self.subject_range),
            "clean": self.clean,
            "corrupted": self.corrupted,
            "matrix": self.matrix.tolist(),
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceResult:
        fields = dict(data)
        fields["subject_range"] = tuple(fields["subject_range"])
        fields["matrix"] = torch.tensor(fields["matrix"], dtype=torch.float32)
        return cls(**fields)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> TraceResult:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class _Setup:
    """What every run of one trace shares."""

    handle: ModelHandle
    ids: torch.Tensor  # [T] prompt ids, on the model's device
    subject: tuple[int, int]
    noise: torch.Tensor  # [S, n_subject, d] noise draws, model dtype and device
    answer_id: int
    clean: dict[str, torch.Tensor]  # kind -> [L, T, d] clean outputs of that kind's modules
    corrupted: torch.Tensor | None = None  # [L+1, S, T, d] block inputs, then the last output

    @property
    def samples(self) -> int:
        return self.noise.shape[0]


def noise_hook(noise: torch.Tensor, subject: tuple[int, int], offset: int) -> HookFn:
    """Embedding hook adding the draws ``noise`` [S, n_subject, d] (row s gets draw s) to the
    subject positions of a run over positions offset…"""
    start, end = subject

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        lo, hi = max(start, offset), min(end, offset + output.shape[1])  # absolute positions
        if hi <= lo:
            return None
        embeds = output.clone()  # [S, T', d]
        embeds[:, lo - offset : hi - offset] += noise[:, lo - start : hi - start]
        return embeds

    return hook


def patch_hook(value: torch.Tensor, rows: torch.Tensor, position: int) -> HookFn:
    """Forward hook writing ``value`` [d] into ``rows`` (bool [B]) at ``position``."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        patched = block_output(output).clone()  # [B, T', d]
        patched[rows, position] = value
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    return hook


def final_hidden(
    handle: ModelHandle,
    input_ids: torch.Tensor,  # [B, T']
    hooks: Iterable[tuple[nn.Module, HookFn]] = (),
    cache: DynamicCache | None = None,
    pre: Iterable[tuple[nn.Module, HookFn]] = (),
) -> torch.Tensor:  # [B, d] final-norm output at the last position
    """Run the blocks (no LM head) and return the last position's normalised hidden state."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(block_output(output)[:, -1].contiguous())
        raise StopForward

    norm = handle.module(handle.adapter.final_norm)
    with thread_hooks(forward=[*hooks, (norm, grab)], pre=list(pre)):
        run_until_stop(handle.model, input_ids=input_ids, cache=cache, use_cache=cache is not None)
    return captured[0]


def answer_probs(handle: ModelHandle, hidden: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer_id) for each row of ``hidden`` [B, d] → [B] float32, HEAD_ROWS rows at a time
    (a contiguous [rows, d] input: the head on a strided slice is many times slower)."""
    probs = [
        torch.log_softmax(handle.head_logits(chunk), -1)[:, answer_id].exp()
        for chunk in hidden.contiguous().split(HEAD_ROWS)
    ]
    return torch.cat(probs)


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def clean_run(
    handle: ModelHandle, ids: torch.Tensor, kinds: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clean prompt: [d] final hidden state at the last position and, per kind, the clean
    outputs [L, T, d] of every layer's module of that kind."""
    states: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    hooks = []
    for kind in kinds:
        for layer in range(handle.n_layers):
            store = states[kind]
            hooks.append(
                (
                    handle.module(module_path(handle, kind, layer)),
                    lambda m, a, out, store=store: store.append(block_output(out)[0].clone()),
                )
            )
    hidden = final_hidden(handle, ids[None], hooks)  # [1, d]
    return hidden[0], {kind: torch.stack(outs) for kind, outs in states.items()}


def corrupted_run(setup: _Setup) -> torch.Tensor:  # [S] P(answer) per noise draw
    """The corrupted prompt, S draws; keeps every block's input (and the last block's output)
    in ``setup.corrupted``: where a restored run that leaves layers below l alone starts."""
    handle, n_layers = setup.handle, setup.handle.n_layers
    states: list[torch.Tensor] = []
    pre = [
        (
            handle.module(handle.adapter.block_path(j)),
            lambda m, a, kw: states.append(_block_input(a, kw).clone()),
        )
        for j in range(n_layers)
    ]
    last = handle.module(handle.adapter.block_path(n_layers - 1))
    hooks = [
        (handle.module(handle.adapter.embed), noise_hook(setup.noise, setup.subject, 0)),
        (last, lambda m, a, out: states.append(block_output(out).clone())),
    ]
    ids = setup.ids.repeat(setup.samples, 1)  # [S, T]
    hidden = final_hidden(handle, ids, hooks, pre=pre)
    setup.corrupted = torch.stack(states)  # [L+1, S, T, d]
    return answer_probs(handle, hidden, setup.answer_id)


def extend_prefix(setup: _Setup, cache: DynamicCache, upto: int) -> None:
    """Add the corrupted positions cache length…upto−1 (one row per draw) to ``cache``."""
    start = cache.get_seq_length()
    if upto <= start:
        return
    handle = setup.handle
    ids = setup.ids[start:upto].repeat(setup.samples, 1)  # [S, upto-start]
    embed = handle.module(handle.adapter.embed)
    final_hidden(handle, ids, [(embed, noise_hook(setup.noise, setup.subject, start))], cache)


Call = tuple[tuple[Any, ...], dict[str, Any]]


def block_calls(setup: _Setup, prefix: DynamicCache, token: int) -> list[Call]:
    """The (args, kwargs) each block receives in a run over positions token… after ``prefix``
    (attention masks, position embeddings, cache positions), recorded from a one-row run."""
    handle = setup.handle
    cache = copy.deepcopy(prefix)
    cache.batch_select_indices(torch.tensor([0], device=handle.device))
    calls: list[Call] = []
    pre = [
        (handle.module(handle.adapter.block_path(j)), lambda m, a, kw: calls.append((a, kw)))
        for j in range(handle.n_layers)
    ]
    final_hidden(handle, setup.ids[token:][None], cache=cache, pre=pre)
    return calls


def _start(site: Site) -> int:
    """The first block whose input differs from the corrupted run's under ``site``."""
    return site.layers[0] + 1 if site.kind == "hidden" else site.layers[0]


@dataclass
class _Rows:
    """Batch rows of one replay: (site, draw) pairs, sorted by the block where they start."""

    site: torch.Tensor  # [N] site index
    draw: torch.Tensor  # [N] noise draw
    start: torch.Tensor  # [N] first block run for the row
    hidden: torch.Tensor  # [N] bool: a hidden-state site (patched when it joins)

    @classmethod
    def of(cls, sites: Sequence[Site], samples: int) -> _Rows:
        order = sorted(range(len(sites)), key=lambda r: _start(sites[r]))
        site = torch.tensor(order).repeat_interleave(samples)
        return cls(
            site=site,
            draw=torch.arange(samples).repeat(len(sites)),
            start=torch.tensor([_start(s) for s in sites])[site],
            hidden=torch.tensor([s.kind == "hidden" for s in sites])[site],
        )

    def active(self, block: int) -> int:
        """Rows run through ``block`` (the first ones, as rows are sorted by start)."""
        return int((self.start <= block).sum())


def join(setup: _Setup, hidden: torch.Tensor, rows: _Rows, level: int, token: int) -> torch.Tensor:
    """Append the rows that start at block ``level``: the corrupted input of that block at
    positions token…, with block level−1's clean output at ``token`` for hidden-state sites."""
    assert setup.corrupted is not None
    joining = rows.start == level
    if not joining.any():
        return hidden
    states = setup.corrupted[level][rows.draw[joining], token:].clone()  # [n, T-t, d]
    restored = rows.hidden[joining]  # [n] rows of hidden-state sites restoring block level−1
    if restored.any():
        states[restored, 0] = setup.clean["hidden"][level - 1, token]
    return torch.cat([hidden, states])


def run_block(
    setup: _Setup,
    layer: int,
    hidden: torch.Tensor,
    call: Call,
    prefix: DynamicCache,
    draws: torch.Tensor,
) -> torch.Tensor:
    """Block ``layer`` on ``hidden`` [N, T-t, d] with its recorded arguments and the prefix's
    keys/values of each row's draw."""
    cache = copy.copy(prefix)  # shallow: only layer ``layer`` is replaced (and then updated)
    cache.layers = list(prefix.layers)
    cache.layers[layer] = copy.deepcopy(prefix.layers[layer])
    cache.layers[layer].batch_select_indices(draws.to(hidden.device))
    args, kwargs = call
    args = (hidden, *(cache if isinstance(a, Cache) else a for a in args[1:]))
    kwargs = {k: cache if isinstance(v, Cache) else v for k, v in kwargs.items()}
    if "hidden_states" in kwargs:
        kwargs["hidden_states"], args = hidden, ()
    block = setup.handle.module(setup.handle.adapter.block_path(layer))
    return block_output(block(*args, **kwargs))


def replay(
    setup: _Setup, sites: Sequence[Site], prefix: DynamicCache, calls: list[Call]
) -> torch.Tensor:  # [R] mean P(answer) under each site
    """Restored runs of R sites at one token t, S draws each, in one batch over positions t…:
    a row joins at the first block its site changes and runs the blocks above it."""
    handle, token, n_layers = setup.handle, sites[0].token, setup.handle.n_layers
    rows = _Rows.of(sites, setup.samples)
    hooks = []
    for (kind, layer), site_ids in patched_modules(sites).items():
        active = rows.site[: rows.active(layer)]
        mask = torch.isin(active, torch.tensor(site_ids)).to(handle.device)
        value = setup.clean[kind][layer, token]  # [d]
        hooks.append((handle.module(module_path(handle, kind, layer)), patch_hook(value, mask, 0)))
    assert setup.corrupted is not None
    hidden = setup.corrupted.new_empty(0, len(setup.ids) - token, setup.corrupted.shape[-1])
    with thread_hooks(forward=hooks):
        for layer in range(n_layers):
            hidden = join(setup, hidden, rows, layer, token)  # [N_l, T-t, d]
            if len(hidden):
                draws = rows.draw[: len(hidden)]
                hidden = run_block(setup, layer, hidden, calls[layer], prefix, draws)
    hidden = join(setup, hidden, rows, n_layers, token)  # [N, T-t, d]
    final = handle.module(handle.adapter.final_norm)(hidden[:, -1])  # [N, d]
    probs = answer_probs(handle, final, setup.answer_id).cpu()  # [N]
    return torch.zeros(len(sites)).index_add_(0, rows.site, probs) / setup.samples


def patched_modules(sites: Sequence[Site]) -> dict[tuple[str, int], list[int]]:
    """(kind, layer) -> indices of the mlp/attn sites that restore it (hidden-state sites are
    restored when their rows join)."""
    modules: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, site in enumerate(sites):
        if site.kind != "hidden":
            for layer in site.layers:
                modules[(site.kind, layer)].append(index)
    return modules


def restore(setup: _Setup, sites: Sequence[Site], batch_tokens: int) -> torch.Tensor:
    """Mean P(answer) under each site → [len(sites)]: sites grouped by token (ascending, the
    corrupted prefix cache grows one token at a time), chunked so that one batch holds at most
    ~``batch_tokens`` rows × prompt tokens (at least one site)."""
    n_tokens = len(setup.ids)
    per_chunk = max(1, batch_tokens // (setup.samples * n_tokens))
    by_token: dict[int, list[int]] = defaultdict(list)
    for index, site in enumerate(sites):
        by_token[site.token].append(index)
    scores = torch.empty(len(sites))
    prefix = DynamicCache(config=setup.handle.model.config)
    for token, indices in sorted(by_token.items()):
        extend_prefix(setup, prefix, token)
        calls = block_calls(setup, prefix, token)
        for i in range(0, len(indices), per_chunk):
            chunk = indices[i : i + per_chunk]
            scores[chunk] = replay(setup, [sites[j] for j in chunk], prefix, calls)
    return scores


# ---------------------------------------------------------------------------------------------
# Entry points


def check_options(kinds: Sequence[str], samples: int, window: int) -> None:
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind: unknown {kind!r}; choose one of {', '.join(KINDS)}")
    if not kinds:
        raise ValueError("kind: give at least one of " + ", ".join(KINDS))
    if samples < 1:
        raise ValueError(f"samples: must be ≥ 1, got {samples}")
    if window < 1:
        raise ValueError(f"window: must be ≥ 1, got {window}")


def prepare(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    answer: str | None,
    kinds: Sequence[str],
    samples: int,
    noise: float | None,
    seed: int,
) -> tuple[_Setup, TracePrompt, float, dict[str, Any]]:
    """Encode, clean run, answer token and noise draws: what every trace of a prompt needs.
    Returns the setup, the encoded prompt, the clean P and the noise provenance."""
    encoded = encode_prompt(handle.tokenizer, prompt, subject)
    std, provenance = noise_level(handle, noise)
    ids = torch.tensor(encoded.ids, device=handle.device)  # [T]
    hidden, states = clean_run(handle, ids, kinds)
    if answer is None:
        answer_id = int(handle.head_logits(hidden[None])[0].argmax())
    else:
        answer_id = answer_token(handle.tokenizer, encoded.text, answer)
    clean = float(answer_probs(handle, hidden[None], answer_id)[0])
    start, end = encoded.subject
    width = handle.module(handle.adapter.embed).weight.shape[1]
    draws = draw_noise(samples, end - start, width, std, seed)
    draws = draws.to(device=handle.device, dtype=handle.dtype)
    setup = _Setup(handle, ids, encoded.subject, draws, answer_id, states)
    return setup, encoded, clean, {"noise": std, "noise_source": provenance}


@torch.no_grad()
def trace_kinds(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    window: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_tokens: int = 8192,
) -> dict[str, TraceResult]:
    """:func:`trace` for several kinds at once, sharing the clean, corrupted and prefix runs."""
    kinds = list(dict.fromkeys(kinds))
    check_options(kinds, samples, window)
    began = time.perf_counter()
    setup, encoded, clean, noise_info = prepare(
        handle, prompt, subject, answer, kinds, samples, noise, seed
    )
    corrupted = float(corrupted_run(setup).mean())
    n_tokens, n_layers, first = len(encoded.ids), handle.n_layers, encoded.subject[0]
    sites = [s for kind in kinds for s in sites_for(kind, n_tokens, n_layers, window, first)]
    scores = restore(setup, sites, batch_tokens)
    seconds = time.perf_counter() - began
    tokenizer = handle.tokenizer
    results = {}
    per_kind = (n_tokens - first) * n_layers
    for k, kind in enumerate(kinds):
        effects = torch.zeros(n_tokens, n_layers)  # [T, L]; zero before the subject (exact)
        effects[first:] = scores[k * per_kind : (k + 1) * per_kind].view(-1, n_layers) - corrupted
        results[kind] = TraceResult(
            prompt=encoded.text,
            subject=subject,
            answer=tokenizer.decode([setup.answer_id]),
            answer_id=setup.answer_id,
            kind=kind,
            tokens=[tokenizer.decode([i]) for i in encoded.ids],
            layers=list(range(n_layers)),
            subject_range=encoded.subject,
            clean=clean,
            corrupted=corrupted,
            matrix=effects,
            settings={
                "samples": samples,
                "window": 1 if kind == "hidden" else window,
                "seed": seed,
                **noise_info,
                "model": handle.name,
                "model_hash": handle.base_hash[:16],
                "dtype": str(handle.dtype).removeprefix("torch."),
                "kinds_traced_together": kinds,
                "seconds": round(seconds, 3),
            },
        )
    return results


def trace(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kind: str = "hidden",
    samples: int = 10,
    window: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_tokens: int = 8192,
) -> TraceResult:
    """Causal trace of one prompt (Meng et al. 2022, section 2; figure 1).

    ``prompt`` is the full text containing ``subject`` (or a template with ``{}`` for it);
    ``answer`` is the expected answer (its first token is scored), None for the model's greedy
    next token; ``noise`` the noise std (None: 3 × the measured std of subject embeddings);
    ``window`` the number of consecutive layers restored for mlp/attn; ``batch_tokens`` bounds
    the token positions in one forward (memory).  The same arguments give the same result.
    """
    results = trace_kinds(
        handle, prompt, subject, answer, [kind], samples, window, noise, seed, batch_tokens
    )
    return results[kind]
