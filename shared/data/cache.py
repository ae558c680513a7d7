"""Build-once cache of processed arrays as `.npz` files (never pickled)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ENV_VAR = "FEDMASK_DATA_DIR"
# Bump whenever a builder's output changes, so stale caches are never reused.
FORMAT_VERSION = 2

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """`$FEDMASK_DATA_DIR`, else `<repo>/.data` (git-ignored)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".data"


def cache_path(cache_dir: Path, task: str, params: Mapping[str, object]) -> Path:
    """`<cache_dir>/<task>-<hash>.npz`; the hash covers every argument that changes the output."""
    blob = json.dumps({"v": FORMAT_VERSION, "task": task, **params}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{task}-{digest}.npz"


def load_or_build(path: Path, build: Callable[[], Mapping[str, np.ndarray]]) -> Arrays:
    """Return the arrays stored at `path`, building and saving them first if absent."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except (OSError, ValueError):
            pass  # a truncated or foreign file: rebuild it
    arrays: dict[str, Any] = dict(build())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file and rename: concurrent workers never see half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is ordinary shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrays
