"""Second-moment statistics of the rewrite module's input: C = E[k kᵀ] (ROME eq. 2).

Keys are collected at every non-padding token of natural text, with a forward pass that stops
right after the deepest layer asked for (never reaching the LM head), and accumulated as
``Σ kᵢ kᵢᵀ`` in float64, batch by batch, the paragraphs in a seeded random order
(:func:`factpatch.corpus.statistics_sample`: a random sample of the corpus, as the reference
code draws it; a title-sorted corpus read from the start would be one alphabetical corner).
C is the uncentred mean.  Results are cached on disk under a key made of the model weights hash,
the layer, the corpus hash, the token count and the sequence length; the provenance is stored
beside the matrix.

Solves use a Cholesky factorisation of C (never an explicit inverse), cached per model and
layer.  If C is not numerically positive definite (too few tokens for its dimension), a ridge
ε·mean(diag C)·I is added, ε = 1e-8, 1e-7, … until the factorisation succeeds; the ridge used
is recorded.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from factpatch.corpus import Corpus, load_corpus, statistics_sample
from factpatch.editing.prompts import pad_batch
from factpatch.models.hooks import StopForward, run_until_stop, thread_hooks
from factpatch.models.loading import ModelHandle
from factpatch.paths import cache_dir, staging_path


@dataclass(frozen=True)
class CovarianceStats:
    cov: torch.Tensor  # [d_key, d_key] float64, uncentred mean of k kᵀ
    n_tokens: int
    provenance: dict[str, Any]


@dataclass(frozen=True)
class CovSolver:
    """Solves C x = k with a cached Cholesky factor (float64)."""

    chol: torch.Tensor  # lower-triangular [d, d] float64
    ridge: float
    n_tokens: int

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """C⁻¹ keys for keys [d] or [d, n]; returns float64 on the keys' device."""
        rhs = keys.to(self.chol.device, torch.float64)
        vector = rhs.dim() == 1
        out = torch.cholesky_solve(rhs.unsqueeze(-1) if vector else rhs, self.chol)
        return (out.squeeze(-1) if vector else out).to(keys.device)


def covariance_solver(
    handle: ModelHandle, layer: int, n_tokens: int, corpus: str | None = None
) -> CovSolver:
    memo = ("cov-solver", layer, n_tokens, corpus)
    if memo not in handle.cache:
        stats = layer_covariances(handle, [layer], n_tokens, corpus)[layer]
        chol, ridge = _cholesky_with_ridge(stats.cov)
        handle.cache[memo] = CovSolver(chol, ridge, stats.n_tokens)
    return handle.cache[memo]


def _cholesky_with_ridge(cov: torch.Tensor) -> tuple[torch.Tensor, float]:
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol, 0.0
    scale = float(cov.diagonal().mean())
    for exponent in range(-8, 0):
        ridge = scale * 10.0**exponent
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        chol, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        if int(info) == 0:
            return chol, ridge
    raise ValueError("covariance is not positive definite even with a ridge of 0.1·mean(diag)")


def layer_covariances(
    handle: ModelHandle,
    layers: list[int],
    n_tokens: int,
    corpus: str | None = None,
    max_len: int = 256,
    batch_size: int = 8,
) -> dict[int, CovarianceStats]:
    """C for each layer in ``layers``: from the disk cache, or all missing ones in one pass."""
    text = load_corpus(corpus)
    found: dict[int, CovarianceStats] = {}
    for layer in layers:
        path = _cache_path(handle, layer, text, n_tokens, max_len)
        if path.is_file():
            cov = load_file(path)["cov"]
            meta = json.loads(path.with_suffix(".json").read_text())
            found[layer] = CovarianceStats(cov, meta["n_tokens"], meta)
    missing = [layer for layer in layers if layer not in found]
    if missing:
        computed = accumulate(handle, missing, text, n_tokens, max_len, batch_size)
        for layer, stats in computed.items():
            path = _cache_path(handle, layer, text, n_tokens, max_len)
            meta, tmp = staging_path(path.with_suffix(".json")), staging_path(path)
            meta.write_text(json.dumps(stats.provenance, indent=1))
            meta.replace(path.with_suffix(".json"))  # the sidecar first: readers open it second
            save_file({"cov": stats.cov.contiguous()}, str(tmp))
            tmp.replace(path)
            found[layer] = stats
    return found


# Bump when the way statistics are gathered changes, so stale caches are not reused.
CACHE_FORMAT = 3


def _cache_path(handle: ModelHandle, layer: int, corpus: Corpus, n_tokens: int, max_len: int):
    name = (
        f"v{CACHE_FORMAT}-{handle.base_hash[:16]}-L{layer}-{corpus.digest[:12]}"
        f"-{n_tokens}tok-{max_len}len"
    )
    return cache_dir("covariance") / f"{name}.safetensors"


@torch.no_grad()
def read_text(
    handle: ModelHandle,
    texts: Sequence[str],
    n_tokens: int,
    max_len: int = 256,
    batch_size: int = 8,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Forward ``texts`` in order, ``batch_size`` at a time, each truncated to ``max_len`` tokens
    and right-padded, until ``n_tokens`` non-padding tokens have been read; the pass stops where
    a hook raises :class:`StopForward`.  Yields, after each pass (the caller's hooks have seen
    it), ``(ids [b, n], mask [b, n], take)``: the batch, its non-padding positions, and how many
    of them, in row-major order, still count towards ``n_tokens``."""
    tok, device, count = handle.tokenizer, handle.device, 0
    for first in range(0, len(texts), batch_size):
        rows = tok(list(texts[first : first + batch_size]), truncation=True, max_length=max_len)
        rows = rows["input_ids"]
        ids = pad_batch(rows, tok.pad_token_id, device)  # right padding: no mask needed
        lengths = torch.tensor([len(r) for r in rows], device=device)
        mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        run_until_stop(handle.model, input_ids=ids, use_cache=False)
        take = min(int(mask.sum()), n_tokens - count)
        yield ids, mask, take
        count += take
        if count >= n_tokens:
            return


@torch.no_grad()
def accumulate(
    handle: ModelHandle,
    layers: list[int],
    corpus: Corpus,
    n_tokens: int,
    max_len: int,
    batch_size: int,
) -> dict[int, CovarianceStats]:
    device = handle.device
    modules = {layer: handle.rewrite_module(layer) for layer in layers}
    d_key = _key_dim(handle, layers[0])
    sums = {
        layer: torch.zeros(d_key, d_key, dtype=torch.float64, device=device) for layer in layers
    }
    keys: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(layer: int):
        def hook(_module, args, kwargs):
            keys[layer] = args[0] if args else kwargs["input"]
            if layer == deepest:
                raise StopForward

        return hook

    count, started = 0, time.perf_counter()
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="covariance", file=sys.stderr)
    with thread_hooks(pre=[(modules[layer], capture(layer)) for layer in layers]):
        texts = statistics_sample(corpus)
        for _ids, mask, take in read_text(handle, texts, n_tokens, max_len, batch_size):
            for layer in layers:
                batch_keys = keys[layer][mask][:take].to(torch.float64)  # [n, d_key]
                sums[layer].addmm_(batch_keys.T, batch_keys)
            count += take
            bar.update(take)
    bar.close()
    seconds = time.perf_counter() - started
    if count < n_tokens:
        print(f"covariance: corpus ran out at {count} of {n_tokens} tokens", file=sys.stderr)
    result = {}
    for layer in layers:
        provenance = {
            "model": handle.name,
            "model_hash": handle.base_hash,
            "layer": layer,
            "module": handle.adapter.rewrite_path(layer),
            "corpus": corpus.name,
            "corpus_hash": corpus.digest,
            "n_tokens": count,
            "n_tokens_requested": n_tokens,
            "max_len": max_len,
            "accumulation": "float64 sum of k kᵀ per batch; divided by n_tokens",
            "order": "statistics_sample: seeded (0) random order, held-out tail excluded",
            "seconds": round(seconds, 2),
        }
        result[layer] = CovarianceStats((sums[layer] / count).cpu(), count, provenance)
    return result


def _key_dim(handle: ModelHandle, layer: int) -> int:
    weight = handle.rewrite_weight(layer)  # (out, in)
    return weight.shape[1]
