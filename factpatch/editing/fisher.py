"""Output-side curvature of the text's loss at a rewrite module: G = E_t[g_t g_tᵀ].

An edit changes the rewrite module's output at every text token t by Δy_t = ΔW k_t.  To second
order, with the Gauss–Newton curvature approximated by the empirical Fisher and factored as
K-FAC does (Martens & Grosse 2015, arXiv 1503.05671: keys and output gradients independent),
the text's summed loss rises by

    ½ · T · tr(G ΔW C ΔWᵀ),    C = E[k kᵀ],   G = E[g gᵀ],   g_t = ∂(Σ_s NLL_s)/∂y_t

(the first-order term vanishes on average at a trained model).  C is the covariance the solves
already use (:mod:`factpatch.editing.covariance`); G weighs the output directions.  ROME's and
MEMIT's updates put the targets δ in the output: ΔW = R Kᵀ A⁻¹ with R = [δ₁ … δ_B], so each
target's share of the cost is proportional to δᵀ G δ.  The target optimisation can therefore
look for the δ that achieves the edit at the least δᵀGδ (``z_metric = "fisher"``,
:func:`factpatch.editing.rome._optimise`): steepest descent in that metric, the step direction
G⁻¹∇ (Amari's natural gradient, with the text's Fisher rather than the edit's own).

g_t comes from one backward pass per batch of paragraphs to the module's output only
(``torch.autograd.grad``: no parameter gradients are formed or stored, so a serving model is
not touched).  Accumulated as Σ g gᵀ in float64 over the corpus's first ``n_tokens`` predicted
tokens, corpus order, divided by their count; cached on disk like C, keyed by the model's
weights hash, the layer, the corpus hash, the token count and the sequence length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from factpatch.corpus import load_corpus
from factpatch.editing.prompts import pad_batch
from factpatch.models.hooks import thread_hooks
from factpatch.models.loading import ModelHandle
from factpatch.paths import cache_dir, staging_path

CACHE_FORMAT = 1
RIDGE = 1e-3  # G + RIDGE·mean(eig G)·I: G's smallest eigenvalues are ~1e-4 of its mean


@dataclass(frozen=True)
class OutputMetric:
    """G (+ ridge) as the optimiser uses it, float32 on the model's device."""

    metric: torch.Tensor  # [out, out]  M = G + ridge·I
    inverse: torch.Tensor  # [out, out]  M⁻¹
    n_tokens: int

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """‖x‖_M = √(xᵀ M x) for x [out]."""
        return (x @ self.metric @ x).clamp(min=0).sqrt()


def output_metric(
    handle: ModelHandle, layer: int, n_tokens: int, corpus: str | None = None
) -> OutputMetric:
    """The metric for ``layer`` (memoised on the handle; G from the disk cache or computed)."""
    memo = ("output-metric", layer, n_tokens, corpus)
    if memo not in handle.cache:
        G = output_fisher(handle, layer, n_tokens, corpus)
        M = G + RIDGE * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(M))
        f32 = dict(device=handle.device, dtype=torch.float32)
        handle.cache[memo] = OutputMetric(M.to(**f32), inverse.to(**f32), n_tokens)
    return handle.cache[memo]


def output_fisher(
    handle: ModelHandle,
    layer: int,
    n_tokens: int,
    corpus: str | None = None,
    max_len: int = 128,
    batch_size: int = 4,
) -> torch.Tensor:
    """G = mean over text tokens of g gᵀ [out, out], float64 on the CPU."""
    text = load_corpus(corpus)
    name = (
        f"v{CACHE_FORMAT}-{handle.base_hash[:16]}-L{layer}-{text.digest[:12]}"
        f"-{n_tokens}tok-{max_len}len"
    )
    path = cache_dir("fisher") / f"{name}.safetensors"
    if path.is_file():
        return load_file(path)["fisher"]
    tok, device = handle.tokenizer, handle.device
    seen: dict[str, torch.Tensor] = {}

    def expose(_module, _args, output):
        output = output.detach().requires_grad_(True)
        seen["y"] = output
        return output

    started, count = time.perf_counter(), 0
    d_out = handle.rewrite_weight(layer).shape[0]
    total = torch.zeros(d_out, d_out, dtype=torch.float64)
    with thread_hooks(forward=[(handle.rewrite_module(layer), expose)]), torch.enable_grad():
        for first in range(0, len(text.texts), batch_size):
            rows = tok(list(text.texts[first : first + batch_size]), truncation=True,
                       max_length=max_len)["input_ids"]  # fmt: skip
            ids = pad_batch(rows, tok.pad_token_id, device)  # right padding: causal, no mask
            lengths = torch.tensor([len(r) for r in rows], device=device)
            predicted = torch.arange(1, ids.shape[1], device=device)[None, :] < lengths[:, None]
            logits = handle.model(input_ids=ids, use_cache=False).logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            (grad,) = torch.autograd.grad((nll * predicted).sum(), [seen["y"]])
            # g at every position that predicts a token (its own and the later ones' loss).
            g = grad[:, :-1][predicted].double().cpu()  # [n, out]
            take = min(g.shape[0], n_tokens - count)
            total.addmm_(g[:take].T, g[:take])
            count += take
            if count >= n_tokens:
                break
    fisher = total / count
    meta = {
        "model": handle.name,
        "model_hash": handle.base_hash,
        "layer": layer,
        "module": handle.adapter.rewrite_path(layer),
        "corpus": text.name,
        "corpus_hash": text.digest,
        "n_tokens": count,
        "max_len": max_len,
        "accumulation": "float64 sum of g gᵀ per batch, corpus order; divided by n_tokens",
        "seconds": round(time.perf_counter() - started, 2),
    }
    sidecar, tmp = staging_path(path.with_suffix(".json")), staging_path(path)
    sidecar.write_text(json.dumps(meta, indent=1))
    sidecar.replace(path.with_suffix(".json"))
    save_file({"fisher": fisher.contiguous()}, str(tmp))
    tmp.replace(path)
    return fisher
