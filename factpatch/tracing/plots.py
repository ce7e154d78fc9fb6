"""Heatmaps of causal traces, drawn like the figures of Meng et al. 2022.

Figure 1 style (:func:`plot_traces`): one panel per kind; tokens down, layers across, subject
tokens marked with ``*``; the colour is P(answer) after restoring, from the corrupted P (the
lightest colour) up; the title holds the prompt and the answer.  Figure 2 style
(:func:`plot_averages`): average indirect effect per token class × layer, one panel per kind,
and (:func:`plot_last_subject`) the last subject token's row of each kind as lines.

Figures are drawn with matplotlib's object API on an Agg canvas: no screen, no pyplot state,
safe to call from a server thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from factpatch.tracing.core import TraceResult
from factpatch.tracing.dataset import AverageResult

COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LINE_COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
STATE_NAMES = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _xlabel(kind: str, window: int, model: str) -> str:
    if kind == "hidden":
        return f"single restored layer within {model}"
    if window == 1:
        return f"single restored {STATE_NAMES[kind]} layer within {model}"
    return f"center of interval of {window} restored {STATE_NAMES[kind]} layers"


def _title(kind: str) -> str:
    state = {"hidden": "states", "mlp": "MLP", "attn": "Attn"}[kind]
    return f"Impact of restoring {state} after corrupted input"


def token_labels(result: TraceResult) -> list[str]:
    start, end = result.subject_range
    return [repr(t)[1:-1] + ("*" if start <= i < end else "") for i, t in enumerate(result.tokens)]


def _trace_panel(fig: Figure, ax: Axes, result: TraceResult) -> None:
    restored = result.restored.numpy()  # [T, L]
    image = ax.pcolormesh(
        restored, cmap=COLOURS[result.kind], vmin=result.corrupted, vmax=max(result.clean, 1e-9)
    )
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(result.tokens))])
    ax.set_yticklabels(token_labels(result), fontsize=8)
    step = max(1, len(result.layers) // 9)
    ax.set_xticks([i + 0.5 for i in range(0, len(result.layers), step)])
    ax.set_xticklabels(result.layers[::step], fontsize=8)
    model = result.settings.get("model", "the model")
    ax.set_xlabel(_xlabel(result.kind, result.settings.get("window", 10), model), fontsize=8)
    ax.set_title(_title(result.kind), fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({result.answer.strip()!r})", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def plot_traces(results: Sequence[TraceResult], path: str | Path) -> Path:
    """One panel per trace (all of the same prompt) side by side, saved as an image."""
    if not results:
        raise ValueError("results: nothing to plot")
    first = results[0]
    height = 1.2 + 0.28 * len(first.tokens)
    fig = Figure(figsize=(4.6 * len(results), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results, strict=True):
        _trace_panel(fig, ax, result)
    fig.suptitle(
        f"{first.prompt!r} → {first.answer.strip()!r}   "
        f"(p clean {first.clean:.3f}, corrupted {first.corrupted:.3f}; "
        f"{first.settings.get('samples')} noise samples, ν={first.settings.get('noise', 0):.3g})",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_averages(averages: Sequence[AverageResult], path: str | Path) -> Path:
    """Average indirect effect per token class × layer, one panel per kind (figure 2)."""
    if not averages:
        raise ValueError("averages: nothing to plot")
    fig = Figure(figsize=(max(4.8 * len(averages), 6.4), 2.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(averages), squeeze=False)[0]
    for ax, average in zip(axes, averages, strict=True):
        image = ax.pcolormesh(average.matrix.numpy(), cmap=COLOURS[average.kind], vmin=0)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(average.classes))])
        ax.set_yticklabels(average.classes, fontsize=8)
        step = max(1, len(average.layers) // 9)
        ax.set_xticks([i + 0.5 for i in range(0, len(average.layers), step)])
        ax.set_xticklabels(average.layers[::step], fontsize=8)
        window = average.settings.get("window", 10)
        ax.set_xlabel(_xlabel(average.kind, window, average.settings.get("model", "")), fontsize=8)
        ax.set_title(f"Avg indirect effect of {STATE_NAMES[average.kind]}", fontsize=9)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("avg indirect effect (Δp)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    first = averages[0]
    fig.suptitle(
        f"{first.settings.get('model', '')}: {first.n_kept} known facts of {first.n_total}; "
        f"mean p clean {first.clean:.3f}, corrupted {first.corrupted:.3f}",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_last_subject(averages: Sequence[AverageResult], path: str | Path) -> Path:
    """The last subject token's average indirect effect by layer, one line per kind."""
    if not averages:
        raise ValueError("averages: nothing to plot")
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for average in averages:
        row = average.matrix[average.classes.index("last subject token")].numpy()
        label = "hidden state" if average.kind == "hidden" else STATE_NAMES[average.kind]
        colour = LINE_COLOURS[average.kind]
        ax.plot(average.layers, row, marker="o", ms=3, color=colour, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0, color="grey", lw=0.5)
    windows = sorted({a.settings.get("window", 10) for a in averages if a.kind != "hidden"} - {1})
    note = f" (centre of the {windows[0]}-layer window for MLP/Attn)" if windows else ""
    ax.set_xlabel("layer" + note)
    ax.set_ylabel("avg indirect effect (Δp)")
    ax.set_title(f"Last subject token, {averages[0].n_kept} known facts", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
