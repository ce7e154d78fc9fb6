"""Experiment record (a prototype, not part of the package; it reaches into private helpers of
factpatch.editing): targets sized in what the text cares about.

MEMIT's update is ΔW = R Kᵀ A⁻¹ with R = [δ₁ … δ_B] the targets in the rewrite module's output
space.  To second order, with the Gauss–Newton curvature approximated by the empirical Fisher
and factored as K-FAC does (Martens & Grosse 2015, arXiv 1503.05671: keys and output gradients
independent), the text's summed loss rises by ½·T·tr(G ΔW C ΔWᵀ), with C = E[k kᵀ] (the
solve's covariance) and G = E[g gᵀ], g_t = ∂(Σ_s NLL_s)/∂y_t the gradient of the text's loss at
the rewrite module's output y_t.  Each target's share is ∝ δᵀGδ.  The reference optimiser (Adam,
lr 0.5, ‖δ‖ ≤ clamp·‖v‖) takes sign-like steps that reach the clamp at once; here δ is found by
steepest descent in M = G + ridge (direction −M⁻¹∇, Polyak's step towards NLL = stop / 2, at
most lr·clamp·‖v‖_M long; ‖δ‖_M ≤ clamp·‖v‖_M), the same loss and stop otherwise.

    python -m research.experiments.target_metric ../shared/data/counterfact/counterfact-val.json \\
        5 '[0.15, 0.3]'

One JSON line per record (‖δ‖, δᵀGδ, final NLL, steps; the reference and each lr) and a
summary on stdout; G (16,384 tokens of the corpus's first paragraphs, float64) takes ≈ 6 min on
the 2-core CPU.  The 100-edit run with these targets used the same optimiser inside the engine
(`z_metric = "fisher"` at commit 53bfc7c, removed afterwards).  Results: research/NOTES.md.
"""

import json
import statistics
import sys

import torch
import torch.nn.functional as F

from factpatch.corpus import load_corpus
from factpatch.editing.hparams import default_memit_hparams
from factpatch.editing.keys import capture
from factpatch.editing.prompts import pad_batch
from factpatch.editing.targets import build_loss_batch, optimise_target, run_blocks
from factpatch.editing.templates import context_templates
from factpatch.evaluation.counterfact import load_records, request_for
from factpatch.models.hooks import thread_hooks
from factpatch.models.loading import load_model

N_TOKENS, RIDGE = 16_384, 1e-3


def output_fisher(h, layer: int, n_tokens: int, max_len: int = 128) -> torch.Tensor:
    """G [out, out], float64: mean over the corpus's first predicted tokens of g gᵀ."""
    seen, count = {}, 0

    def expose(_m, _a, out):
        seen["y"] = out.detach().requires_grad_(True)
        return seen["y"]

    texts = load_corpus(None).texts
    total = torch.zeros(h.rewrite_weight(layer).shape[0], h.rewrite_weight(layer).shape[0],
                        dtype=torch.float64)  # fmt: skip
    with thread_hooks(forward=[(h.rewrite_module(layer), expose)]), torch.enable_grad():
        for first in range(0, len(texts), 4):
            rows = h.tokenizer(list(texts[first : first + 4]), truncation=True,
                               max_length=max_len)["input_ids"]  # fmt: skip
            ids = pad_batch(rows, h.tokenizer.pad_token_id, h.device)
            lengths = torch.tensor([len(r) for r in rows])
            predicted = torch.arange(1, ids.shape[1])[None, :] < lengths[:, None]
            logits = h.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            (grad,) = torch.autograd.grad((nll * predicted).sum(), [seen["y"]])
            g = grad[:, :-1][predicted].double()[: n_tokens - count]
            total.addmm_(g.T, g)
            count += g.shape[0]
            if count >= n_tokens:
                return total / count
    return total / count


def natural_optimise(h, request, hp, templates, M: torch.Tensor, M_inv: torch.Tensor):
    """(δ, final NLL, steps): the reference loss, minimised by steepest descent in M."""
    batch = build_loss_batch(h, request, templates)
    rows = torch.arange(batch.ids.shape[0])
    blocks = h.module(h.adapter.blocks)
    captured, io = capture(h, batch.ids, hp.layer)
    v = io["values"][0, batch.subject_pos[0]].float()

    def m_norm(x):
        return (x @ M @ x).clamp(min=0).sqrt()

    radius = hp.clamp_norm_factor * m_norm(v)
    at = torch.zeros((*batch.ids.shape, 1))
    at[rows, batch.subject_pos] = 1.0
    delta = torch.zeros_like(v, requires_grad=True)
    log_p_orig, nll_end, step = None, 0.0, 0
    with thread_hooks(forward=[(h.rewrite_module(hp.layer), lambda m, a, o: o + at * delta)]):
        for step in range(hp.steps + 1):
            hidden = run_blocks(blocks, captured, range(hp.layer, h.n_layers))
            targets = hidden[batch.nll_rows, batch.nll_pos]
            picked = torch.cat([targets, hidden[batch.kl_rows, batch.kl_pos]])
            lp = F.log_softmax(h.logits(picked).float(), -1)
            nll = (-lp[:-1].gather(1, batch.nll_ids[:, None]).squeeze(1) * batch.nll_weight).sum()
            if log_p_orig is None:
                log_p_orig = lp[-1].detach()
            kl = F.kl_div(lp[-1], log_p_orig, log_target=True, reduction="sum")
            loss = nll + hp.kl_factor * kl + hp.weight_decay * delta.norm() / v.norm() ** 2
            nll_end = float(nll.detach())
            if step == hp.steps or nll_end < hp.early_stop_loss:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            with torch.no_grad():
                direction = M_inv @ grad  # −M⁻¹∇: steepest in M
                slope = float(m_norm(direction))  # loss drop per unit M-length
                size = min(hp.lr * radius, max(nll_end - hp.early_stop_loss / 2, 0) / slope)
                delta -= size * direction / slope
                if m_norm(delta) > radius:
                    delta *= radius / m_norm(delta)
    return delta.detach(), nll_end, step


def main() -> None:
    data, n, lrs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    h = load_model("gemma-3-270m", device="cpu", dtype="float32")
    reference = default_memit_hparams(h).z_hparams()
    templates = context_templates(h, [tuple(t) for t in reference.templates], 0)
    G = output_fisher(h, reference.layer, N_TOKENS)
    M = G + RIDGE * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype)
    M_inv = torch.cholesky_inverse(torch.linalg.cholesky(M)).float()
    M, G = M.float(), G.float()
    ratios: dict[float, list[float]] = {lr: [] for lr in lrs}
    for record in load_records(data, n):
        request = request_for(record)
        _, _, delta, stats = optimise_target(h, request, reference, templates, None)
        row = {"case": record["case_id"], "reference": {
            "norm": round(stats.delta_norm, 3), "gGg": round(float(delta @ G @ delta), 4),
            "nll": round(stats.nll_end, 4), "steps": stats.steps}}  # fmt: skip
        for lr in lrs:
            hp = reference.with_overrides(lr=lr, steps=60)
            delta, nll, steps = natural_optimise(h, request, hp, templates, M, M_inv)
            row[str(lr)] = {"norm": round(float(delta.norm()), 3), "nll": round(nll, 4),
                            "gGg": round(float(delta @ G @ delta), 4), "steps": steps}  # fmt: skip
            if nll < hp.early_stop_loss:
                ratios[lr].append(row[str(lr)]["gGg"] / row["reference"]["gGg"])
        print(json.dumps(row), flush=True)
    print(json.dumps({lr: {"reached": len(r), "median_gGg_ratio": statistics.median(r) if r
                           else None} for lr, r in ratios.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
