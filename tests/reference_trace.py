"""Causal tracing the plain way: one whole forward per restoration, as the paper's reference
code does it (Meng et al. 2022, ``trace_with_patch``).

Each restoration runs the batch [clean row, S corrupted rows] over the whole prompt; hooks copy
the clean row's output at (token, layer) into the corrupted rows in the same forward, and the
model's own LM head gives P(answer) at the last position.  No key/value cache, no skipped
positions, no shortcut around the head.  It is the oracle the tests compare
:func:`factpatch.tracing.trace` with, and the naive baseline of ``python -m bench.trace_speed``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from factpatch.models.hooks import HookFn, block_output, thread_hooks
from factpatch.models.loading import ModelHandle
from factpatch.tracing.core import (
    TraceResult,
    check_options,
    module_path,
    prepare,
    sites_for,
)


def copy_clean_row(position: int) -> HookFn:
    """Forward hook: rows 1… take row 0's output at ``position``."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        patched = block_output(output).clone()  # [1+S, T, d]
        patched[1:, position] = patched[0, position]
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    return hook


def corrupt_rows(noise: torch.Tensor, subject: tuple[int, int]) -> HookFn:
    """Embedding hook: rows 1… get the noise draws [S, n_subject, d] on the subject tokens."""
    start, end = subject

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        embeds = output.clone()  # [1+S, T, d]
        embeds[1:, start:end] += noise
        return embeds

    return hook


def run_patched(
    handle: ModelHandle,
    ids: torch.Tensor,  # [T]
    noise: torch.Tensor,  # [S, n_subject, d]
    subject: tuple[int, int],
    answer_id: int,
    patches: list[str],
    position: int,
) -> tuple[float, float]:
    """One forward of [clean, S corrupted] rows: (P clean row, mean P corrupted rows)."""
    batch = ids.repeat(1 + noise.shape[0], 1)  # [1+S, T]
    hooks = [(handle.module(handle.adapter.embed), corrupt_rows(noise, subject))]
    hooks += [(handle.module(path), copy_clean_row(position)) for path in patches]
    with thread_hooks(forward=hooks):
        logits = handle.model(input_ids=batch, use_cache=False).logits[:, -1].float()
    probs = torch.softmax(logits, -1)[:, answer_id]  # [1+S]
    return float(probs[0]), float(probs[1:].mean())


@torch.no_grad()
def trace_reference(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kind: str = "hidden",
    samples: int = 10,
    window: int = 10,
    noise: float | None = None,
    seed: int = 0,
) -> TraceResult:
    """:func:`factpatch.tracing.trace` computed with one forward per (token, layer)."""
    check_options([kind], samples, window)
    setup, encoded, _, noise_info = prepare(
        handle, prompt, subject, answer, [kind], samples, noise, seed
    )
    ids, draws, answer_id = setup.ids, setup.noise, setup.answer_id
    clean, corrupted = run_patched(handle, ids, draws, encoded.subject, answer_id, [], 0)
    n_tokens, n_layers = len(encoded.ids), handle.n_layers
    effects = torch.zeros(n_tokens, n_layers)  # [T, L]
    for index, site in enumerate(sites_for(kind, n_tokens, n_layers, window)):
        paths = [module_path(handle, kind, layer) for layer in site.layers]
        _, restored = run_patched(handle, ids, draws, encoded.subject, answer_id, paths, site.token)
        effects[site.token, index % n_layers] = restored - corrupted
    tokenizer = handle.tokenizer
    return TraceResult(
        prompt=encoded.text,
        subject=subject,
        answer=tokenizer.decode([answer_id]),
        answer_id=answer_id,
        kind=kind,
        tokens=[tokenizer.decode([i]) for i in encoded.ids],
        layers=list(range(n_layers)),
        subject_range=encoded.subject,
        clean=clean,
        corrupted=corrupted,
        matrix=effects,
        settings={"samples": samples, "window": window, "seed": seed, **noise_info},
    )
