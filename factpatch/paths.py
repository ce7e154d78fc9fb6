"""Where factpatch keeps its caches (converted models, covariance statistics, templates) and
its data (the embedded Redis: ledger and queue)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """``$FACTPATCH_CACHE_DIR`` or the user's cache dir, plus ``parts``; created on demand."""
    root = os.environ.get("FACTPATCH_CACHE_DIR") or platformdirs.user_cache_dir("factpatch")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir() -> Path:
    """``$FACTPATCH_DATA_DIR`` or the user's data dir (the embedded Redis lives here)."""
    return Path(os.environ.get("FACTPATCH_DATA_DIR") or platformdirs.user_data_dir("factpatch"))


def staging_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and call: write there, then
    ``os.replace`` onto ``path`` — so processes sharing a cache never see or clobber each
    other's half-written files."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
