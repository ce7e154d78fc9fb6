"""Experiment record (a prototype, not part of the package; it reaches into private helpers of
factpatch.editing): sequential batches with one δ per edited layer (each added at its layer's own
rewrite output, each clamped to c_j·‖v_j‖), optionally ENCORE's most-probable early stopping
(Gupta et al. 2025, arXiv 2502.01636), then MEMIT's solve per layer with the keys recomputed after
the layers below.  Results: research/NOTES.md, "How much text the perplexity needs".

    python -m research.experiments.sequential_variants \\
        '[{"layers": [2]}, {"layers": [1, 2, 3], "clamp": 0.33},
          {"layers": [2], "mpes": true, "z": {"lr": 0.1}}]' \\
        ../shared/data/counterfact/counterfact-train.json 3000 --unedited

Each configuration: two batches of 50 from the offset, perplexity on 16 held-back paragraphs after
each batch and on 256 after the last, ES/PS/NS over all 100 facts; one JSON line per
configuration appended to /tmp/sequential_variants.jsonl.
"""

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from factpatch.editing import base_weights, load_weights
from factpatch.editing.hparams import default_memit_hparams
from factpatch.editing.keys import Rows, capture, trace
from factpatch.editing.solve import covariances
from factpatch.editing.targets import build_loss_batch, run_blocks
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import request_for, summarise
from factpatch.evaluation.sequential import heldout_paragraphs, measure_records, perplexity
from factpatch.models.hooks import thread_hooks
from factpatch.models.loading import load_model


def optimise(h, request, hp, templates, layers, clamps, mpes):
    batch = build_loss_batch(h, request, templates)
    rows = torch.arange(batch.ids.shape[0])
    blocks = h.module(h.adapter.blocks)
    captured, io = capture(h, batch.ids, layers[0])
    v_norm = {}
    deltas = {
        j: torch.zeros(io["values"].shape[-1], device=h.device, requires_grad=True) for j in layers
    }
    at = torch.zeros((*batch.ids.shape, 1), device=h.device)
    at[rows, batch.subject_pos] = 1.0
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)

    def add(j):
        def hook(_m, _a, out):
            if j not in v_norm:
                v_norm[j] = out[0, batch.subject_pos[0]].detach().float().norm()
            return out + at * deltas[j]

        return hook

    log_p_orig = None
    with thread_hooks(forward=[(h.rewrite_module(j), add(j)) for j in layers]):
        for step in range(hp.steps + 1):
            hidden = run_blocks(blocks, captured, range(layers[0], h.n_layers))
            picked = torch.cat(
                [
                    hidden[batch.nll_rows, batch.nll_pos],
                    hidden[batch.kl_rows, batch.kl_pos],
                ]
            )
            lp = F.log_softmax(h.logits(picked).float(), -1)
            nll = (-lp[:-1].gather(1, batch.nll_ids[:, None]).squeeze(1) * batch.nll_weight).sum()
            if log_p_orig is None:
                log_p_orig = lp[-1].detach()
            kl = F.kl_div(lp[-1], log_p_orig, log_target=True, reduction="sum")
            decay = sum(hp.weight_decay * deltas[j].norm() / v_norm[j] ** 2 for j in layers)
            loss = nll + hp.kl_factor * kl + decay
            top = bool((lp[:-1].argmax(-1) == batch.nll_ids).all())
            if step == hp.steps or float(nll.detach()) < hp.early_stop_loss or (mpes and top):
                break
            grads = torch.autograd.grad(loss, list(deltas.values()))
            for d, g in zip(deltas.values(), grads, strict=True):
                d.grad = g
            opt.step()
            with torch.no_grad():
                for j, c in zip(layers, clamps, strict=True):
                    mx = c * v_norm[j]
                    n = deltas[j].norm()
                    if n > mx:
                        deltas[j].mul_(mx / n)
    return {j: d.detach() for j, d in deltas.items()}, step


def solve(h, reqs, ds, layers, lam, templates, covs):
    rows = Rows.build(h, reqs, templates)
    first = trace(h, rows, layers, {}, layers[-1])
    prior, updates, info = {}, {}, []
    for j in layers:
        now = trace(h, rows, [j], prior, j)
        K = rows.average(now.keys[j]).double().T  # [in, B]
        a = first.values[j][rows.bare] + torch.stack([d[j] for d in ds])
        v = now.values[j][rows.bare]
        a = a * (
            (a * v).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True)
        )  # post-norm: scale free
        R = (a - v).double()  # [B, out]
        right = torch.linalg.solve(lam * covs[j] + K @ K.T, K)
        dW = R.T @ right.T
        info.append(
            {
                "layer": j,
                "ratio_per_fact": float(
                    dW.norm() / h.rewrite_weight(j).double().norm() / math.sqrt(len(reqs))
                ),
            }
        )
        prior[j] = (R.T.float(), right.float())
        updates[j] = dW
    return updates, info


def run(cfg, h, records, held, out):
    layers, clamps = (
        cfg["layers"],
        cfg.get("clamps") or [cfg.get("clamp", 1.0)] * len(cfg["layers"]),
    )
    B, nb, lam, mpes = (
        cfg.get("batch", 50),
        cfg.get("batches", 2),
        cfg.get("lam", 300.0),
        cfg.get("mpes", False),
    )
    hp = default_memit_hparams(h)
    zhp = dataclasses.replace(hp.z_hparams(), **cfg.get("z", {}))
    templates = context_templates(h, [tuple(t) for t in hp.templates], hp.template_seed)
    covs = covariances(h, layers, hp.cov_tokens, None)
    paths = {j: h.adapter.rewrite_path(j) for j in layers}
    base = base_weights(h, list(paths.values()))
    total = {j: torch.zeros_like(base[paths[j]], dtype=torch.float64) for j in layers}
    res = {**cfg, "points": []}
    for b in range(nb):
        reqs = [request_for(r) for r in records[b * B : (b + 1) * B]]
        t0 = time.time()
        ds, steps = [], []
        for r in reqs:
            d, s = optimise(h, r, zhp, templates, layers, clamps, mpes)
            ds.append(d)
            steps.append(s)
        t_opt = time.time() - t0
        updates, info = solve(h, reqs, ds, layers, lam, templates, covs)
        for j in layers:
            total[j] += updates[j]
        load_weights(h, {paths[j]: (base[paths[j]].double() + total[j]).float() for j in layers})
        pt = {
            "edits": (b + 1) * B,
            "steps": sum(steps) / B,
            "opt_s": t_opt,
            "info": info,
            "delta_norm": {
                j: float(torch.stack([d[j] for d in ds]).norm(dim=-1).mean()) for j in layers
            },
            "ppl": perplexity(h, held),
        }
        if b == nb - 1 or cfg.get("measure_all"):
            pt.update(summarise(measure_records(h, records[: (b + 1) * B])))
            pt["ppl256"] = perplexity(h, WIDE)
        res["points"].append(pt)
        print(json.dumps(pt), flush=True)
    load_weights(h, base)
    out.write(json.dumps(res) + "\n")
    out.flush()


if __name__ == "__main__":
    torch.manual_seed(0)
    h = load_model("gemma-3-270m", device=None, dtype="float32")  # CUDA when present
    data, offset = sys.argv[2], int(sys.argv[3])
    records = json.loads(Path(data).read_text())[offset : offset + 400]
    held, _ = heldout_paragraphs(None, 16)
    WIDE = heldout_paragraphs(None, 256)[0]
    out = open("/tmp/sequential_variants.jsonl", "a")  # noqa: SIM115 (open for the whole run)
    if "--unedited" in sys.argv:
        u = {
            "unedited": True,
            "data": data,
            "offset": offset,
            "ppl": perplexity(h, held),
            **summarise(measure_records(h, records[:100])),
        }
        print(json.dumps(u), flush=True)
        out.write(json.dumps(u) + "\n")
        out.flush()
    for cfg in json.loads(sys.argv[1]):
        cfg = {**cfg, "data": data, "offset": offset}
        print("#", json.dumps(cfg), flush=True)
        run(cfg, h, records, held, out)
