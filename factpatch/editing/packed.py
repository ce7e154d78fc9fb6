"""Re-running only what δ can change: each row's positions from the subject on, packed.

ROME adds δ to W's output at the subject's last token s_i of every row i (Meng et al. 2022,
eq. 4).  In a causal model no position before s_i, at any layer, depends on δ, so after one
full pass the target optimisation re-runs only positions s_i … end of each row.  They are packed
into one sequence without padding; each attends to its own row's earlier positions through the
keys and values recorded in the full pass, and to its own row's packed positions causally (and
within the layer's sliding window, where it has one) — the attention of the full run, written as
an explicit mask.  On the bundled Gemma, the README tour's edit re-runs 45 of its 7 × 22 = 154
positions per step (docs/benchmarks.md).

The recorded keys and values come through the attention's own cache argument: :class:`PrefixKV`
is a duck-typed transformers ``Cache`` (``update(keys, values, layer_idx, …)`` returns what the
attention uses), so no family's attention code is copied.  Where a block takes an input this
module does not know how to pack, :func:`pack_inputs` says so and the caller keeps full runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

# Block keyword inputs that carry one entry per position and are packed here; any other tensor
# input makes a block unpackable.
_PER_POSITION = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


class PrefixKV:
    """Records every layer's keys/values (first pass), then puts the recorded prefix in front
    of the packed positions' own keys/values (later passes)."""

    def __init__(self) -> None:
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefix is None:
            self.recorded[layer_idx] = (keys.detach(), values.detach())
            return keys, values
        prefix_keys, prefix_values = self.prefix[layer_idx]
        return torch.cat([prefix_keys, keys], -2), torch.cat([prefix_values, values], -2)


@dataclass
class Packing:
    """Where each row's re-run positions go in the packed sequence."""

    rows: torch.Tensor  # [Q] row of each packed position
    pos: torch.Tensor  # [Q] its position in that row
    index: torch.Tensor  # [B, T] packed index of (row, position); -1 where not re-run
    prefix_rows: torch.Tensor  # [P] row of each recorded position (before the row's start)
    prefix_pos: torch.Tensor  # [P] its position

    @classmethod
    def plan(cls, starts: torch.Tensor, lengths: torch.Tensor, width: int) -> Packing:
        """Rows re-run from ``starts`` [B] to ``lengths`` [B] (exclusive), of a [B, width]
        batch."""
        device = starts.device
        grid = torch.arange(width, device=device).expand(len(starts), width)
        rerun = (grid >= starts[:, None]) & (grid < lengths[:, None])
        before = grid < starts[:, None]
        rows, pos = rerun.nonzero(as_tuple=True)  # row-major: each row's positions in order
        prefix_rows, prefix_pos = before.nonzero(as_tuple=True)
        index = torch.full((len(starts), width), -1, dtype=torch.long, device=device)
        index[rows, pos] = torch.arange(len(rows), device=device)
        return cls(rows, pos, index, prefix_rows, prefix_pos)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B or 1, T, …] → [1, Q, …]: the packed positions' entries."""
        return x.expand(len(self.index), *x.shape[1:])[self.rows, self.pos][None]

    def prefix(self, recorded: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Per layer, the recorded [B, heads, T, d] keys/values of the positions before each
        row's start, as one [1, heads, P, d] sequence."""

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x[self.prefix_rows, :, self.prefix_pos].transpose(0, 1)[None]

        return {layer: (pick(k), pick(v)) for layer, (k, v) in recorded.items()}

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, Q, P + Q] additive mask: a packed position sees its own row's recorded
        positions and its own row's packed positions up to itself (within ``window``)."""
        key_rows = torch.cat([self.prefix_rows, self.rows])[None]
        key_pos = torch.cat([self.prefix_pos, self.pos])[None]
        distance = self.pos[:, None] - key_pos
        visible = (key_rows == self.rows[:, None]) & (distance >= 0)
        if window is not None:
            visible &= distance < window
        blocked = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype, device=visible.device)
        return torch.where(visible, zero, blocked)[None, None]


def keyword_inputs(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's captured call as ``((hidden,), every other input by keyword)`` (GPT-2's blocks
    are called with the cache and mask by position)."""
    signature = inspect.signature(block.forward)
    values = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(values.pop(name, {}))
    hidden = values.pop(next(iter(signature.parameters)))
    return (hidden,), values


def with_cache(
    captured: dict[int, tuple[tuple, dict]], cache_kwarg: str, cache: PrefixKV
) -> dict[int, tuple[tuple, dict]]:
    """The captured block inputs with ``cache`` passed as the attention's cache."""
    return {i: (args, {**kwargs, cache_kwarg: cache}) for i, (args, kwargs) in captured.items()}


def pack_inputs(
    captured: dict[int, tuple[tuple, dict]],
    packing: Packing,
    cache_kwarg: str,
    cache: PrefixKV,
    windows: dict[int, int | None],
) -> dict[int, tuple[tuple, dict]] | None:
    """Every block's captured inputs in the packed layout (the first block's hidden states
    gathered; the others' are fed from below), or None where a block has an input that cannot
    be packed."""
    packed: dict[int, tuple[tuple, dict]] = {}
    masks: dict[int | None, torch.Tensor] = {}  # one per distinct window
    for i, (args, kwargs) in captured.items():
        if any(isinstance(a, torch.Tensor) for a in args[1:]):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = dict(kwargs)
        for name, value in kwargs.items():
            tensors = value if isinstance(value, tuple) else (value,)
            known = name in _PER_POSITION or name == "hidden_states"
            if not known and any(isinstance(t, torch.Tensor) for t in tensors):
                return None
        if windows[i] not in masks:
            masks[windows[i]] = packing.mask(windows[i], hidden.dtype)
        kwargs["attention_mask"] = masks[windows[i]]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = packing.gather(kwargs["position_ids"])
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(
                packing.gather(t) for t in kwargs["position_embeddings"]
            )
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = packing.pos
        kwargs[cache_kwarg] = cache
        hidden = packing.gather(hidden)
        if args:
            packed[i] = ((hidden, *args[1:]), kwargs)
        else:
            packed[i] = (args, {**kwargs, "hidden_states": hidden})
    return packed
