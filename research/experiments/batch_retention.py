"""Experiment record: do a sequential run's edits hold as later batches follow?

For a checkpointed run (MEMIT or AlphaEdit, one delta per batch), each batch's facts are scored
(ES / PS / NS over that batch's 100 records) on the model right after their own batch
(base + deltas 0..b) and on the model after the run's last checkpointed batch.

    python -m research.experiments.batch_retention \\
        ../shared/data/counterfact/counterfact-val.json results/seq1000/memit-layer4

Printed lines; results: research/NOTES.md (research/results/batch_retention_memit-layer4.txt).
"""

import json
import sys
from pathlib import Path

from factpatch.editing import base_weights, load_weights, materialize
from factpatch.evaluation.counterfact import load_records, summarise
from factpatch.evaluation.sequential import checkpoint_deltas, measure_records
from factpatch.models import load_model


def main(data: str, folder: str) -> None:
    report = json.loads((Path(folder) / "progress.json").read_text())
    deltas = checkpoint_deltas(folder)
    records = load_records(data, report["n_edits_planned"])
    handle = load_model("gemma-3-270m", dtype="float32")  # the runs were float32
    size = report["batch"]
    base = base_weights(handle, [handle.adapter.rewrite_path(j) for j in report["layers"]])
    last = len(deltas)
    for k in range(1, last + 1):
        load_weights(handle, materialize(handle, base, deltas[:k]))
        for b in range(k):
            if b == k - 1 or k == last:
                s = summarise(measure_records(handle, records[b * size : (b + 1) * size]))
                print(
                    f"batch {b} after {k} batches: ES {s['efficacy']:.1f} "
                    f"PS {s['paraphrase']:.1f} NS {s['neighborhood']:.1f}",
                    flush=True,
                )
    load_weights(handle, base)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
