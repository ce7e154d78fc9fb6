"""The keys k: what the rewrite module reads at the subject's last token (ROME sec. 3.1, the
reference's ``compute_u`` side; MEMIT sec. 4.3's K_l).

* :func:`capture` — one pass over a batch of prompts that records the inputs of every block from
  the edited layer up (what the target optimisation re-runs) and the rewrite module's input
  (keys) and output (values) at that layer.
* :class:`Rows` / :func:`trace` — every (request, context template) prompt of a batch, and one
  pass over them, with earlier updates of the same call added on the fly, that records keys,
  values and the residual stream at the subject (MEMIT's spreading, replays).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factpatch.editing.delta import output_hook
from factpatch.editing.prompts import encode, pad_batch
from factpatch.editing.requests import EditRequest
from factpatch.models.hooks import StopForward, block_output, run_until_stop, thread_hooks
from factpatch.models.loading import ModelHandle

ROWS_PER_PASS = 64  # rows per forward pass when collecting keys (bounds memory at batch 100+)


@torch.no_grad()
def capture(
    handle: ModelHandle, ids: torch.Tensor, layer: int
) -> tuple[dict[int, tuple[tuple, dict]], dict[str, torch.Tensor]]:
    """One forward pass that records the inputs of every block from ``layer`` up, and the
    rewrite module's input (keys) and output (values) at ``layer``; it stops before the head."""
    blocks = handle.module(handle.adapter.blocks)
    captured: dict[int, tuple[tuple, dict]] = {}
    io: dict[str, torch.Tensor] = {}

    def keep_block_inputs(index: int):
        def hook(_module, args, kwargs):
            captured[index] = (args, kwargs)

        return hook

    def keep_rewrite_io(_module, args, output):
        io["keys"], io["values"] = args[0], output

    def stop(_module, _args, _kwargs):
        raise StopForward

    with thread_hooks(
        forward=[(handle.rewrite_module(layer), keep_rewrite_io)],
        pre=[(blocks[i], keep_block_inputs(i)) for i in range(layer, handle.n_layers)]
        + [(handle.module(handle.adapter.final_norm), stop)],
    ):
        run_until_stop(handle.model, input_ids=ids, use_cache=False)
    return captured, io


@dataclass
class Rows:
    """Every (request, template) prompt, right-padded, with the subject's last position."""

    ids: list[list[int]]
    subject_pos: list[int]
    owner: torch.Tensor  # [rows] request index of each row
    bare: torch.Tensor  # [B] the row of each request's bare prompt (template "{}")
    n_requests: int

    @classmethod
    def build(cls, handle: ModelHandle, requests: list[EditRequest], templates: list[str]):
        ids, pos, owner, bare = [], [], [], []
        for i, request in enumerate(requests):
            for template in templates:
                enc = encode(
                    handle.tokenizer, template.replace("{}", request.prompt), request.subject
                )
                if template == "{}":
                    bare.append(len(ids))
                ids.append(enc.ids)
                pos.append(enc.subject_last)
                owner.append(i)
        return cls(ids, pos, torch.tensor(owner), torch.tensor(bare), len(requests))

    def average(self, per_row: torch.Tensor) -> torch.Tensor:
        """Mean over each request's rows: [rows, d] → [B, d]."""
        owner = self.owner.to(per_row.device)
        sums = torch.zeros(self.n_requests, per_row.shape[1], dtype=per_row.dtype)
        sums = sums.to(per_row.device).index_add_(0, owner, per_row)
        counts = torch.bincount(owner, minlength=self.n_requests).to(per_row)
        return sums / counts[:, None]


@dataclass
class Trace:
    keys: dict[int, torch.Tensor]  # layer → [rows, in] rewrite input at the subject position
    values: dict[int, torch.Tensor]  # layer → [rows, out] rewrite output (updates included)
    hidden: torch.Tensor  # [rows, d] residual stream after block ``stop`` at the subject


@torch.no_grad()
def trace(
    handle: ModelHandle,
    rows: Rows,
    layers: list[int],
    prior: dict[int, tuple[torch.Tensor, torch.Tensor]],
    stop: int,
) -> Trace:
    """Forward every row up to block ``stop`` with ``prior`` updates added on the fly; record
    the rewrite modules' inputs/outputs at ``layers`` and the residual after ``stop``."""
    device = handle.device
    blocks = handle.module(handle.adapter.blocks)
    keys: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    values: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    hidden: list[torch.Tensor] = []
    at: dict[str, torch.Tensor] = {}

    def record(layer: int):
        def hook(_module, args, output):
            keys[layer].append(args[0][at["rows"], at["pos"]].float())
            values[layer].append(output[at["rows"], at["pos"]].float())

        return hook

    def finish(_module, _args, output):
        hidden.append(block_output(output)[at["rows"], at["pos"]].float())
        raise StopForward

    forward = [
        (handle.rewrite_module(j), output_hook(left.to(device), right.to(device)))
        for j, (left, right) in sorted(prior.items())
    ]
    forward += [(handle.rewrite_module(j), record(j)) for j in layers]
    forward += [(blocks[stop], finish)]
    pad = handle.tokenizer.pad_token_id
    with thread_hooks(forward=forward):
        for first in range(0, len(rows.ids), ROWS_PER_PASS):
            chunk = rows.ids[first : first + ROWS_PER_PASS]
            at["rows"] = torch.arange(len(chunk), device=device)
            at["pos"] = torch.tensor(rows.subject_pos[first : first + ROWS_PER_PASS], device=device)
            run_until_stop(handle.model, input_ids=pad_batch(chunk, pad, device), use_cache=False)
    return Trace(
        {j: torch.cat(keys[j]) for j in layers},
        {j: torch.cat(values[j]) for j in layers},
        torch.cat(hidden),
    )
