"""Benchmark of the merge kernel against a straightforward unpack-count-compare-pack version."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from shared.aggregate import merge_masks

U8 = npt.NDArray[np.uint8]


def naive_merge(structures: U8, masks: U8, nbits: int, *, vote_region: U8 | None = None, min_voters: int = 2,
                count_dtype: type[np.integer] | None = None) -> U8:
    """The same rule as `merge_masks`, written the obvious way: unpack every participant's bits
    (one byte per bit), sum them into integer counts (numpy's default integer sum), compare,
    pack back. Fully vectorised; no Python loops."""
    keep = np.unpackbits(structures, axis=1, count=nbits).view(np.bool_)
    own = np.unpackbits(masks, axis=1, count=nbits).view(np.bool_)
    # count_dtype None: numpy's default (int64) sums, the reference the target names; uint16 is the
    # tuned variant (narrow counts, 4x less memory traffic), reported beside it for honesty.
    voters = keep.sum(axis=0, dtype=count_dtype)
    ones = own.sum(axis=0, dtype=count_dtype)
    if count_dtype is not None:
        voters, ones = voters.astype(np.int32), ones.astype(np.int32)
    allowed = voters >= min_voters
    if vote_region is not None:
        allowed &= np.unpackbits(vote_region, count=nbits).view(np.bool_)
    up = allowed & (2 * ones > voters)
    down = allowed & (2 * ones < voters)
    merged = (own | (keep & up)) & ~down
    return np.packbits(merged, axis=1)


def _best_time(fn: Callable[[], U8], repeats: int) -> tuple[float, U8]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def run_aggregate_bench(
    devices: int = 20,
    params: int = 15_000_000,
    density: float = 0.5,
    structure_keep: float = 0.6,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float | int | bool]:
    """Time `naive_merge` and `merge_masks` (best of `repeats`) on random data; raise if they differ."""
    if devices < 1 or params < 1 or repeats < 1:
        raise ValueError("devices, params and repeats must be >= 1")
    rng = np.random.default_rng(seed)
    shape = (devices, -(-params // 8))
    structures, masks = np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=np.uint8)
    for i in range(devices):  # row by row: a full (devices, params) float array would be GBs
        structures[i] = np.packbits(rng.random(params, dtype=np.float32) < structure_keep)
        masks[i] = structures[i] & np.packbits(rng.random(params, dtype=np.float32) < density)

    naive_s, expected = _best_time(lambda: naive_merge(structures, masks, params), repeats)
    tuned_s, tuned = _best_time(lambda: naive_merge(structures, masks, params, count_dtype=np.uint16), repeats)
    kernel_s, got = _best_time(lambda: merge_masks(structures, masks, params), repeats)
    if not (np.array_equal(expected, got) and np.array_equal(expected, tuned)):
        raise AssertionError("merge_masks output differs from naive_merge")
    input_bytes = structures.nbytes + masks.nbytes
    return {
        "devices": devices,
        "params": params,
        "naive_seconds": naive_s,
        "kernel_seconds": kernel_s,
        "speedup": naive_s / kernel_s,
        "tuned_naive_seconds": tuned_s,
        "speedup_vs_tuned_naive": tuned_s / kernel_s,
        "kernel_params_per_second": params / kernel_s,
        "kernel_mb_per_second": input_bytes / kernel_s / 1e6,
        "identical": True,
    }
