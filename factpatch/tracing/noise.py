"""The corruption of causal tracing: Gaussian noise on the subject tokens' embeddings.

Meng et al. 2022 (section 2.1) corrupt the subject with noise ε ~ N(0, ν²) where ν is 3 × the
empirical standard deviation of subject-token embeddings.  The standard deviation is measured
here once per model over the subjects of the paper's "known facts" set (``KNOWN_SUBJECTS``),
on the output of the adapter's ``embed`` module (for Gemma that output includes the √d scale),
and cached as JSON with its provenance under ``cache_dir("tracing")``, keyed by the weights
hash and the subject list's sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from factpatch.models.loading import ModelHandle
from factpatch.paths import cache_dir

# The subjects of the "known facts" set (Meng et al. 2022, section 2.1; MIT licence): the 1,195
# distinct subjects of known_1000.json in file order, shipped so the measurement needs no data
# folder.
KNOWN_SUBJECTS: tuple[str, ...] = tuple(
    files("factpatch").joinpath("data/known_subjects.txt").read_text().splitlines()
)
NOISE_FACTOR = 3.0  # ν = 3 × std of subject embeddings (the paper's setting)
FORMAT = 1  # bump when the measurement changes


def noise_level(handle: ModelHandle, noise: float | None = None) -> tuple[float, dict[str, Any]]:
    """The noise std to use and where it came from: ``noise`` if given, else 3 × the measured
    std of subject-token embeddings."""
    if noise is not None:
        if not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise: must be a finite number ≥ 0, got {noise!r}")
        return float(noise), {"source": "explicit"}
    record = subject_embedding_std(handle)
    provenance = {
        "source": f"{NOISE_FACTOR:g} × std of subject-token embeddings",
        "factor": NOISE_FACTOR,
        "std": record["std"],
        "n_subjects": record["n_subjects"],
        "n_tokens": record["n_tokens"],
        "subjects_sha256": record["subjects_sha256"][:16],
    }
    return NOISE_FACTOR * record["std"], provenance


def subject_embedding_std(
    handle: ModelHandle, subjects: Sequence[str] = KNOWN_SUBJECTS
) -> dict[str, Any]:
    """std over every element of the embeddings of every token of ``subjects`` (each subject
    tokenised alone, without special tokens); memoised on the handle and on disk."""
    digest = hashlib.sha256("\n".join(subjects).encode()).hexdigest()
    key = ("tracing-embed-std", FORMAT, digest)
    if key in handle.cache:
        return handle.cache[key]
    path = cache_path(handle, digest)
    if path.is_file():
        record = json.loads(path.read_text())
    else:
        record = _measure(handle, subjects, digest)
        _write_atomic(path, record)
    handle.cache[key] = record
    return record


def cache_path(handle: ModelHandle, subjects_digest: str) -> Path:
    name = f"embed-std-v{FORMAT}-{handle.base_hash[:16]}-{subjects_digest[:12]}.json"
    return cache_dir("tracing") / name


@torch.no_grad()
def _measure(handle: ModelHandle, subjects: Sequence[str], digest: str) -> dict[str, Any]:
    if not subjects:
        raise ValueError("subjects: need at least one subject to measure the noise level")
    ids = [i for s in subjects for i in handle.tokenizer(s, add_special_tokens=False)["input_ids"]]
    embed = handle.module(handle.adapter.embed)
    token_ids = torch.tensor([ids], device=handle.device)  # [1, N]
    embeds = embed(token_ids)[0].double()  # [N, d]
    return {
        "format": FORMAT,
        "std": float(embeds.std()),
        "mean": float(embeds.mean()),
        "n_subjects": len(subjects),
        "n_tokens": len(ids),
        "subjects_sha256": digest,
        "subjects": "known_1000.json subjects (Meng et al. 2022)"
        if list(subjects) == list(KNOWN_SUBJECTS)
        else "caller-supplied",
        "model": handle.name,
        "model_hash": handle.base_hash,
        "embed_module": handle.adapter.embed,
        "dtype": str(handle.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_atomic(path: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)  # concurrent writers produce the same content; last one wins


def draw_noise(
    samples: int, n_tokens: int, width: int, std: float, seed: int
) -> torch.Tensor:  # [samples, n_tokens, width] float32, on the CPU
    """The noise draws of one trace: seeded, so the same arguments give the same tensor."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, width, generator=generator) * std
