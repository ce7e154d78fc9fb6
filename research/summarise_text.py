"""Summarise research/text_after_edit.py JSON lines per setting (means over records).

python research/summarise_text.py research/results/text_known_train16.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def share(rows: list[dict], when: str, first: str, second: str) -> float:
    """% of rows where P(first) > P(second) in ``when`` ("before"/"after")."""
    return 100 * statistics.fmean(
        r[when]["scores"][first] > r[when]["scores"][second] for r in rows
    )


def text_mean(rows: list[dict], when: str, key: str) -> float:
    return statistics.fmean(r[when]["text"][key] for r in rows)


def summary(rows: list[dict]) -> dict[str, float]:
    kept = [r["after"]["essence_kept"] for r in rows if r["after"]["essence_kept"] is not None]
    out = {
        "n": len(rows),
        "ES": share(rows, "after", "rewrite_new", "rewrite_true"),
        "PS": share(rows, "after", "para_new", "para_true"),
        "NS": share(rows, "after", "nb_true", "nb_new"),
        "NS_unedited": share(rows, "before", "nb_true", "nb_new"),
        "PS_margin": statistics.fmean(
            r["after"]["scores"]["para_new"] - r["after"]["scores"]["para_true"] for r in rows
        ),
        "essence_kept": statistics.fmean(kept),
        "essence_probes": sum(r["essence_probes"] for r in rows),
        "median_seconds": statistics.median(r["seconds"] for r in rows),
    }
    for key in ("fluency_greedy", "fluency_sampled", "degenerate", "consistency"):
        out[f"{key}_before"] = text_mean(rows, "before", key)
        out[f"{key}_after"] = text_mean(rows, "after", key)
    return out


def main() -> None:
    by_setting = defaultdict(list)
    for path in sys.argv[1:]:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            by_setting[row["setting"]].append(row)
    for name, rows in by_setting.items():
        s = summary(rows)
        print(
            f"{name}: n={s['n']} ES {s['ES']:.1f} PS {s['PS']:.1f} "
            f"(margin {s['PS_margin']:+.3f}) NS {s['NS']:.1f} "
            f"(unedited NS {s['NS_unedited']:.1f}); essence kept {s['essence_kept']:.3f} "
            f"({s['essence_probes']} probes); median {s['median_seconds']:.1f} s/edit"
        )
        for key in ("fluency_greedy", "fluency_sampled", "degenerate", "consistency"):
            before, after = s[f"{key}_before"], s[f"{key}_after"]
            ratio = f" ratio {after / before:.3f}" if key.startswith("fluency") else ""
            print(f"   {key:16} before {before:.3f} after {after:.3f}{ratio}")


if __name__ == "__main__":
    main()
