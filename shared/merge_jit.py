"""The merge kernel compiled with numba: the same rule as shared.aggregate's numpy kernel, in one pass.

Why compiled: the numpy kernel issues one ufunc call per bit-sliced operation, so every word of
the inputs goes through about 15 array operations per device (carry-save adders for the voter and
the one counts, the comparison, the output), each a round trip through the cache. At 20 devices x
15M parameters those operations alone took 29 ms with every operand in cache, against 7 ms for one
read of the inputs (docs/results.md, "Against memory bandwidth"). Here one loop reads each input word
once, keeps the counts of a cache-sized block of columns in small plane arrays, and writes each
output word once.

Per block of columns: rows enter four at a time (two full adders on plane 0, one on plane 1, the
carry rippled up the higher planes), the rest one at a time; then the bit-sliced comparison gives
A = "majority 1" and Z = "majority 0" (module docstring of shared.aggregate), and
out_i = (M_i | (S_i & A)) & ~Z.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

# Without numba the numpy kernel in shared.aggregate serves instead. numba is imported on the first
# merge, not here: importing it takes about 0.6 s, which every process importing shared would pay.
AVAILABLE = importlib.util.find_spec("numba") is not None

# Below this many packed bytes per input (devices x bytes per mask) the numpy kernel takes a few ms,
# less than loading the compiled kernel from numba's cache (about 1 s per process; 5 s on first compile),
# so small fleets and the test suite never import numba. 4 MB: 20 devices x 1.6M parameters.
MIN_BYTES = 4 << 20

W64 = npt.NDArray[np.uint64]
_ALIGN = 8
_FULL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _bitlen(x: int) -> int:
    k = 0
    while (x >> k) > 0:
        k += 1
    return k


def _fold(planes: W64, carry: W64, j0: int, k: int, w: int) -> None:
    """Add `carry` (weight 2**j0) into planes j0..k-1 (k: planes the count needs so far)."""
    for j in range(j0, k):
        pj = planes[j]
        for c in range(w):
            a, b = pj[c], carry[c]
            pj[c] = a ^ b
            carry[c] = a & b


def _count_block(rows: W64, planes: W64, carry: W64, c0: int, w: int) -> None:
    """Bit-sliced counts of columns [c0, c0 + w) over all rows into planes (zeroed by the caller)."""
    n = rows.shape[0]
    p0, p1 = planes[0], planes[1]
    i = 0
    while i + 4 <= n:  # full adders: sum = a ^ b ^ c, carry = (a & b) | ((a ^ b) & c)
        r0, r1, r2, r3 = rows[i, c0:c0 + w], rows[i + 1, c0:c0 + w], rows[i + 2, c0:c0 + w], rows[i + 3, c0:c0 + w]
        for c in range(w):
            a, b, d, e, p = r0[c], r1[c], r2[c], r3[c], p0[c]
            u = p ^ a
            low = (p & a) | (u & b)
            p = u ^ b
            u = p ^ d
            high = (p & d) | (u & e)
            p0[c] = u ^ e
            p = p1[c]
            u = p ^ low
            carry[c] = (p & low) | (u & high)
            p1[c] = u ^ high
        i += 4
        _fold(planes, carry, 2, _bitlen(i), w)
    while i < n:
        r = rows[i, c0:c0 + w]
        for c in range(w):
            carry[c] = r[c]
        i += 1
        _fold(planes, carry, 0, _bitlen(i), w)


def _merge_words(structures: W64, masks: W64, region: W64, has_region: bool, threshold: int,
                 out: W64, chunk: int) -> int:
    """Merge (n, words) uint64 rows into `out`; 1 if some mask has a bit outside its structure, else 0.

    threshold > 0: a vote also needs at least that many voters (min_voters > 2; see merge_masks)."""
    n, words = structures.shape
    kv = _bitlen(n)  # planes of a count up to n; plane kv stays zero (the comparison reads it)
    voters = np.zeros((kv + 1, chunk), np.uint64)
    ones = np.zeros((kv + 1, chunk), np.uint64)
    carry = np.empty(chunk, np.uint64)
    gt, lt, eq = np.empty(chunk, np.uint64), np.empty(chunk, np.uint64), np.empty(chunk, np.uint64)
    for c0 in range(0, words, chunk):
        w = min(chunk, words - c0)
        voters[:, :w] = 0
        ones[:, :w] = 0
        _count_block(structures, voters, carry, c0, w)
        _count_block(masks, ones, carry, c0, w)
        # gt = 2*ones > voters, lt = 2*ones < voters, most significant plane first; (2*ones)_j = ones_{j-1}.
        for c in range(w):
            gt[c], lt[c], eq[c] = 0, 0, _FULL
        for j in range(kv, 0, -1):
            oj, vj = ones[j - 1], voters[j]
            for c in range(w):
                a, b, e = oj[c], vj[c], eq[c]
                gt[c] |= e & a & ~b
                lt[c] |= e & b & ~a
                eq[c] = e & ~(a ^ b)
        v0 = voters[0]
        for c in range(w):
            lt[c] |= eq[c] & v0[c]
        if threshold > 0:  # voters >= threshold: eq = "equal on the planes so far", carry = "greater"
            for c in range(w):
                carry[c], eq[c] = 0, _FULL
            for j in range(kv - 1, -1, -1):
                vj = voters[j]
                if (threshold >> j) & 1:
                    for c in range(w):
                        eq[c] &= vj[c]
                else:
                    for c in range(w):
                        carry[c] |= eq[c] & vj[c]
            for c in range(w):
                allowed = carry[c] | eq[c]
                gt[c] &= allowed
                lt[c] &= allowed
        if has_region:
            r = region[c0:c0 + w]
            for c in range(w):
                gt[c] &= r[c]
                lt[c] &= r[c]
        bad = np.uint64(0)  # checked while the block's rows are in cache; the caller raises
        for i in range(n):
            s, m, o = structures[i, c0:c0 + w], masks[i, c0:c0 + w], out[i, c0:c0 + w]
            for c in range(w):
                bad |= m[c] & ~s[c]
                o[c] = (m[c] | (s[c] & gt[c])) & ~lt[c]
        if bad:
            return 1
    return 0


@functools.cache
def _compiled() -> Callable[..., int]:
    """The compiled kernel (cache=True: compiled once per machine, about 5 s; then loaded, about 1 s)."""
    import numba

    jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    module = globals()
    for name in ("_bitlen", "_fold", "_count_block"):  # compiled code calls these by their global names
        module[name] = jit(module[name])
    kernel: Callable[..., int] = jit(_merge_words)
    return kernel


def pays(packed_bytes: int) -> bool:
    """Whether a merge over `packed_bytes` of packed masks per input uses the compiled kernel by default."""
    return AVAILABLE and packed_bytes >= MIN_BYTES


def _words(data: np.ndarray, words: int) -> W64:
    """A (rows, nbytes) uint8 array as (rows, words) uint64: a view when aligned, else a zero-padded copy."""
    rows, nbytes = data.shape
    if data.flags.c_contiguous and nbytes == words * _ALIGN and data.ctypes.data % _ALIGN == 0:
        return data.view(np.uint64)
    padded = np.zeros((rows, words * _ALIGN), dtype=np.uint8)
    padded[:, :nbytes] = data
    return padded.view(np.uint64)


def merge_packed(structures: np.ndarray, masks: np.ndarray, vote_region: np.ndarray | None,
                 threshold: int, out: np.ndarray, chunk_words: int) -> bool:
    """Merge validated packed inputs (n >= 2) into `out` (n, nbytes) uint8; False if some mask has
    a bit outside its structure (the caller names the row). Needs AVAILABLE."""
    nbytes = structures.shape[1]
    words = -(-nbytes // _ALIGN)
    region = np.zeros((1, _ALIGN), np.uint8) if vote_region is None else vote_region[None, :]
    region_words = _words(region, words if vote_region is not None else 1)[0]
    target = _words(out, words)
    bad = _compiled()(_words(structures, words), _words(masks, words), region_words, vote_region is not None,
                    threshold, target, max(1, min(chunk_words, words)))
    if not np.shares_memory(target, out):
        out[:] = target.view(np.uint8)[:, :nbytes]
    return not bad
