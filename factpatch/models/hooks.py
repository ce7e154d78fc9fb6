"""Thread-private forward hooks.

factpatch computes edits on the same model object that serves traffic.  Every hook it registers
acts only in the thread that registered it (other threads' forward passes run through it
untouched) and is removed when the ``with`` block ends, even on error.  So computing an edit
never changes what another thread sees, and no hook is left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing above it is computed)."""


HookFn = Callable[..., Any]


@contextmanager
def thread_hooks(
    forward: list[tuple[nn.Module, HookFn]] = (),  # type: ignore[assignment]
    pre: list[tuple[nn.Module, HookFn]] = (),  # type: ignore[assignment]
) -> Iterator[None]:
    """Register ``forward`` hooks ``fn(module, args, output)`` and ``pre`` hooks
    ``fn(module, args, kwargs) -> (args, kwargs) | None`` that act in this thread only."""
    owner = threading.get_ident()

    def private(fn: HookFn) -> HookFn:
        def hook(*hook_args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return fn(*hook_args)

        return hook

    handles = [module.register_forward_hook(private(fn)) for module, fn in forward]
    handles += [
        module.register_forward_pre_hook(private(fn), with_kwargs=True) for module, fn in pre
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(model: nn.Module, **inputs: Any) -> None:
    """Run a forward pass that a :class:`StopForward` hook may end early."""
    with suppress(StopForward):
        model(**inputs)


def block_output(output: Any) -> Any:
    """A transformer block returns its hidden states alone or first in a tuple."""
    return output[0] if isinstance(output, tuple) else output
