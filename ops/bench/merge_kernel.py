"""`fedmask bench aggregate`: the merge kernel (shared.aggregate.merge_masks) against the naive
unpack-count-compare-pack reference (shared.aggregate.merge_masks_reference), on the same inputs."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from shared.aggregate import merge_masks, merge_masks_reference

U8 = npt.NDArray[np.uint8]
KERNEL_OVER_READ_TARGET = 2.0  # from issue 14: the kernel within 2x of one pass over its inputs


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
    """Time `merge_masks_reference` (numpy's default int64 counts, then uint16 counts: the "tuned
    naive" row) and `merge_masks` (best of `repeats`) on random data; raise if they differ."""
    if devices < 1 or params < 1 or repeats < 1:
        raise ValueError("devices, params and repeats must be >= 1")
    rng = np.random.default_rng(seed)
    shape = (devices, -(-params // 8))
    structures, masks = np.empty(shape, dtype=np.uint8), np.empty(shape, dtype=np.uint8)
    for i in range(devices):  # row by row: a full (devices, params) float array would be GBs
        structures[i] = np.packbits(rng.random(params, dtype=np.float32) < structure_keep)
        masks[i] = structures[i] & np.packbits(rng.random(params, dtype=np.float32) < density)

    naive_s, expected = _best_time(lambda: merge_masks_reference(structures, masks, params), repeats)
    tuned_s, tuned = _best_time(lambda: merge_masks_reference(structures, masks, params, count_dtype=np.uint16),
                                repeats)
    kernel_s, got = _best_time(lambda: merge_masks(structures, masks, params), repeats)
    read_s = _read_pass_seconds(structures, masks, repeats)
    if not (np.array_equal(expected, got) and np.array_equal(expected, tuned)):
        raise AssertionError("merge_masks output differs from merge_masks_reference")
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
        # One read of the kernel's packed inputs, timed in the same run: what memory bandwidth allows.
        "read_pass_seconds": read_s,
        "read_pass_mb_per_second": input_bytes / read_s / 1e6,
        "kernel_over_read_pass": kernel_s / read_s,
        "kernel_over_read_target": KERNEL_OVER_READ_TARGET,
    }


def _read_pass_seconds(structures: U8, masks: U8, repeats: int) -> float:
    """Best time to read both inputs once: an OR-reduction over 64-bit words, which does one add-like
    op per 8 bytes and so runs at memory bandwidth (the arrays are far larger than the caches)."""
    words = [a.reshape(-1)[: a.size // 8 * 8].view(np.uint64) for a in (structures, masks)]
    best = float("inf")
    for _ in range(max(3, repeats)):
        start = time.perf_counter()
        for w in words:
            np.bitwise_or.reduce(w)
        best = min(best, time.perf_counter() - start)
    return best
