"""Plot sequential-editing curves (ES/PS/NS against the number of edits), one line per method.

python -m research.plot bench/results/sequential_*.json --out docs/images/x.png

With ``--perplexity FILE`` (JSON lines of :mod:`research.remeasure`) the perplexity
panel shows the re-measured values of the runs that file covers (matched by checkpoint folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from factpatch.editing.hparams import MemitHParams, RomeHParams, recorded_settings

METRICS = (
    ("efficacy", "Efficacy (ES)"),
    ("paraphrase", "Paraphrase (PS)"),
    ("neighborhood", "Neighbourhood (NS)"),
)
COLOURS = {"rome": "tab:red", "memit": "tab:blue", "alphaedit": "tab:green"}
GATED_COLOUR = "tab:purple"
STYLES = ("-", "--", "-.", ":")  # runs of one method: same colour, one line style each
SHORT = {  # hyperparameter names in legends
    "clamp_norm_factor": "clamp",
    "mom2_update_weight": "λ",
    "prior_weight": "μ",
    "nullspace_l2": "α",
    "nullspace_threshold": "threshold",
    "gate_threshold": "gate τ",
}


def labels(reports: list[dict]) -> list[str]:
    """The method's name, plus the settings that tell apart runs of the same method."""
    settings = [_settings(r) for r in reports]
    out = []
    for report, mine in zip(reports, settings, strict=True):
        same = [
            s for r, s in zip(reports, settings, strict=True) if r["method"] == report["method"]
        ]
        keys = sorted({k for s in same for k in s})
        differ = [k for k in keys if len({json.dumps(s.get(k)) for s in same}) > 1]
        extra = ", ".join(f"{SHORT.get(k, k)}={_show(mine.get(k))}" for k in differ)
        out.append(f"{report['method']} ({extra})" if extra else report["method"])
    return out


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else json.dumps(value)


def _settings(report: dict) -> dict[str, Any]:
    """A run's hyperparameters (one it does not record, added after it ran, at its default) and
    the key gate it was measured behind, if any."""
    kind = RomeHParams if report["method"] == "rome" else MemitHParams
    settings = recorded_settings(kind, report.get("hparams", {}))
    return {**settings, "gate_threshold": report.get("gate_threshold")}


def with_perplexity(report: dict, remeasured: dict) -> dict:
    """``report`` with its perplexities (unedited and along the curve) replaced by a
    :func:`research.remeasure.remeasure_perplexity` result for the same run."""
    by_edits = {p["n_edits"]: p["perplexity"] for p in remeasured["curve"]}
    curve = []
    for point in report["curve"]:
        point = {k: v for k, v in point.items() if k != "perplexity"}
        if point["n_edits"] in by_edits:
            point["perplexity"] = by_edits[point["n_edits"]]
        curve.append(point)
    return {
        **report,
        "unedited_perplexity": remeasured["unedited_perplexity"],
        "curve": curve,
        "perplexity_paragraphs": {
            **report.get("perplexity_paragraphs", {}),
            "corpus_indices": remeasured["corpus_indices"],
        },
    }


def _style(reports: list[dict], index: int) -> dict:
    """One colour per method (runs measured behind a key gate: their own), one line style per
    run of it."""

    def group(report: dict) -> tuple[str, bool]:
        return report["method"], report.get("gate_threshold") is not None

    mine = group(reports[index])
    nth = sum(group(r) == mine for r in reports[:index])
    colour = GATED_COLOUR if mine[1] else COLOURS.get(mine[0])
    return {"color": colour, "ls": STYLES[nth % len(STYLES)]}


def plot(reports: list[dict], out: str, title: str) -> None:
    wear = any("perplexity" in p for r in reports for p in r["curve"])
    fig, axes = plt.subplots(
        1, 4 if wear else 3, figsize=(17 if wear else 13, 4.6), sharex=True, layout="constrained"
    )
    if wear:  # perplexity change along the curve, against each run's unedited model
        ax = axes[-1]
        for i, report in enumerate(reports):
            base = report["unedited_perplexity"]
            points = [p for p in report["curve"] if "perplexity" in p]  # older runs: none
            xs = [0] + [p["n_edits"] for p in points]
            ys = [0.0] + [100 * (p["perplexity"] - base) / base for p in points]
            ax.plot(xs, ys, marker="o", **_style(reports, i))
        ax.axhline(5, color="k", ls=":", label="target (+5 %)")
        counts = {
            r["perplexity_paragraphs"]["corpus_indices"][1]
            - r["perplexity_paragraphs"]["corpus_indices"][0]
            + 1
            for r in reports
            if "perplexity_paragraphs" in r
        }
        text = f"{counts.pop()} held-back paragraphs" if len(counts) == 1 else "held-back Wikipedia"
        ax.set_title(f"Perplexity change\n({text})")
        ax.set_xlabel("number of edits")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    names = labels(reports)
    for (key, label), ax in zip(METRICS, axes[:3], strict=True):
        for i, report in enumerate(reports):
            xs = [p["n_edits"] for p in report["curve"]]
            ys = [p[key] for p in report["curve"]]
            ax.plot(xs, ys, marker="o", label=names[i], **_style(reports, i))
        if key == "neighborhood":
            first = reports[0]
            xs = [p["n_edits"] for p in first["curve"]]
            unedited = [p["unedited_neighborhood"] for p in first["curve"]]
            ax.plot(xs, unedited, "k--", label="unedited")
        ax.set_title(label)
        ax.set_xlabel("number of edits")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of edited facts")
    fig.legend(*axes[2].get_legend_handles_labels(), loc="outside lower center", ncol=4)
    fig.suptitle(title)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="Sequential CounterFact edits, gemma-3-270m")
    parser.add_argument("--perplexity", help="remeasure JSON lines to plot instead")
    args = parser.parse_args(argv)
    remeasured = {}
    if args.perplexity:
        for line in Path(args.perplexity).read_text().splitlines():
            found = json.loads(line)
            remeasured[Path(found["run"]).resolve()] = found
    reports = []
    for path in args.reports:
        report = json.loads(Path(path).read_text())
        again = remeasured.get(Path(path).parent.resolve())
        reports.append(with_perplexity(report, again) if again else report)
    plot(reports, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
