"""What the latency benchmarks share: nearest-rank percentiles of measured seconds."""

from __future__ import annotations


def percentile(seconds: list[float], q: float) -> float:
    """The q-th percentile (0–100) by nearest rank: one of the measured values, not a blend."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: list[float], q: float, digits: int = 1) -> float:
    """``percentile`` in milliseconds, rounded; 0.0 for no measurement."""
    return round(1e3 * percentile(seconds, q), digits) if seconds else 0.0
