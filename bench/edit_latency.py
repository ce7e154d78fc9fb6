"""Where the time of one ROME edit goes, and what the fast optimisation step saves.

    python bench/edit_latency.py [--model gemma-3-270m] [--n 10] [--out results/edit_latency.json]

Reports, over the first N records of the CounterFact file:
* per-phase seconds of ``compute_edit`` (keys = capture pass, optimise = the δ steps,
  solve = C⁻¹k̄ with the cached Cholesky factor), steps taken, and apply / materialise time;
* one-time costs: context-template sampling, covariance factorisation (from the disk cache);
* side by side on the same prompts: one optimisation step done the naive way (the whole model,
  LM head and log-softmax over every position) against factpatch's step (blocks from the edited
  layer up, head only where the loss reads).  The ratio is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from factpatch.editing import apply_delta, base_weights, compute_edit, default_hparams, materialize
from factpatch.editing.covariance import covariance_solver
from factpatch.editing.keys import capture
from factpatch.editing.targets import build_loss_batch, run_blocks, upper_modules
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import load_records, request_for
from factpatch.models import load_model
from factpatch.models.hooks import thread_hooks

DATA = "../shared/data/counterfact/counterfact-val.json"


def step_times(handle, request, hp, templates, repeats: int = 3) -> dict[str, float]:
    """Seconds for one forward+backward step: naive full model vs factpatch's truncated run."""
    batch = build_loss_batch(handle, request, templates)
    rows = torch.arange(batch.ids.shape[0])
    rewrite = handle.rewrite_module(hp.layer)
    d_out = handle.rewrite_weight(hp.layer).shape[0]
    delta = torch.zeros(d_out, requires_grad=True)
    at_subject = torch.zeros((*batch.ids.shape, 1))
    at_subject[rows, batch.subject_pos] = 1.0

    def add(_m, _a, out):
        return out + at_subject * delta

    def naive() -> None:
        with thread_hooks(forward=[(rewrite, add)]):
            logits = handle.model(input_ids=batch.ids, use_cache=False).logits
            log_probs = F.log_softmax(logits.float(), -1)
            loss = (
                -log_probs[batch.nll_rows, batch.nll_pos].gather(1, batch.nll_ids[:, None]).mean()
            )
            torch.autograd.grad(loss, [delta])

    captured, _ = capture(handle, batch.ids, hp.layer)
    blocks = handle.module(handle.adapter.blocks)

    def fast() -> None:
        with thread_hooks(forward=[(rewrite, add)]):
            hidden = run_blocks(blocks, captured, range(hp.layer, handle.n_layers))
            picked = hidden[batch.nll_rows, batch.nll_pos]
            log_probs = F.log_softmax(upper_modules(handle, hp.layer).logits(picked).float(), -1)
            loss = -log_probs.gather(1, batch.nll_ids[:, None]).mean()
            torch.autograd.grad(loss, [delta])

    out = {}
    for name, fn in (("naive_step", naive), ("factpatch_step", fast)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    out["step_speedup"] = out["naive_step"] / out["factpatch_step"]
    out["batch_shape"] = list(batch.ids.shape)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="results/edit_latency.json")
    args = parser.parse_args()

    t0 = time.perf_counter()
    handle = load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - t0
    hp = default_hparams(handle)
    t0 = time.perf_counter()
    templates = context_templates(handle, [tuple(t) for t in hp.templates], hp.template_seed)
    template_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    covariance_solver(handle, hp.layer, hp.cov_tokens)
    cov_seconds = time.perf_counter() - t0

    path = handle.adapter.rewrite_path(hp.layer)
    base = base_weights(handle, [path])
    edits = []
    for record in load_records(args.data, args.n):
        request = request_for(record)
        t0 = time.perf_counter()
        delta = compute_edit(handle, request, hp)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_delta(handle, delta)
        apply_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        materialize(handle, base, [delta])
        materialize_seconds = time.perf_counter() - t0
        apply_delta(handle, delta, alpha=-1.0)
        stats = delta.provenance["stats"][0]
        edits.append(
            {
                "subject": request.subject,
                "steps": stats["steps"],
                "total": total,
                **stats["seconds"],
                "apply": apply_seconds,
                "materialize": materialize_seconds,
            }
        )
    steps = step_times(handle, request_for(load_records(args.data, 1)[0]), hp, templates)

    phases = ["keys", "optimise", "solve", "apply", "materialize", "total"]
    summary = {p: statistics.median(e[p] for e in edits) for p in phases}
    summary["steps"] = statistics.median(e["steps"] for e in edits)
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": handle.name,
        "device": str(handle.device),
        "dtype": str(handle.dtype),
        "hparams": hp.to_dict(),
        "one_time_seconds": {
            "load_model": load_seconds,
            "templates_cached_or_sampled": template_seconds,
            "covariance_from_cache_and_cholesky": cov_seconds,
        },
        "median_seconds": summary,
        "step_comparison": steps,
        "edits": edits,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("median_seconds", "step_comparison")}, indent=1))


if __name__ == "__main__":
    main()
