"""FedMask merge kernel (paper Sec. 3.6): per-element majority vote among the devices that keep the element.

For device i and element e (S = structure, M = mask, M ⊆ S):
  e ∉ S_i                                      -> 0
  e ∈ S_i, e in vote_region, voters >= min_voters -> majority of the voters' mask bits (tie: own bit)
  otherwise                                    -> own bit M_i[e]
With A = "vote and majority is 1" and Z = "vote and majority is 0" that is
  out_i = (M_i | (S_i & A)) & ~Z,
which never sets a bit outside S_i because M_i ⊆ S_i and A ⊆ ~Z.

`merge_masks` evaluates this on 64-bit words (64 elements per operation), one cache-sized
block of words at a time: in shared.merge_jit's compiled loop when numba is installed (one pass
over the inputs), else in the numpy kernel below (one ufunc call per operation). Votes are
counted with bit-sliced carry-save adders: full adders reduce the devices' rows column by
column (here many rows per numpy call) down to ceil(log2(n+1)) bit planes of the count,
which bit-sliced comparators then turn into A and Z (shared/adder_kernel.py).
`merge_masks_reference` is the slow, obviously correct per-element version.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared import merge_jit
from shared.adder_kernel import ALIGN, Job, Kernel, Words, bad_rows, raise_bad_row
from shared.bits import check_packed

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]


# ---------------------------------------------------------------- validation


def _check_inputs(
    structures: np.ndarray,
    masks: np.ndarray,
    nbits: int,
    vote_region: np.ndarray | None,
    min_voters: int,
) -> None:
    """Shape, dtype, length and padding checks shared by every entry point (cheap)."""
    if structures.ndim != 2 or masks.ndim != 2:
        raise ValueError(f"structures and masks must be 2-D, got {structures.shape} and {masks.shape}")
    if structures.shape != masks.shape:
        raise ValueError(f"structures {structures.shape} and masks {masks.shape} differ in shape")
    if structures.shape[0] < 1:
        raise ValueError("need at least one participant (n >= 1)")
    if min_voters < 1:
        raise ValueError(f"min_voters must be >= 1, got {min_voters}")
    check_packed(structures, nbits, "structures")
    check_packed(masks, nbits, "masks")
    if vote_region is not None:
        if vote_region.ndim != 1:
            raise ValueError(f"vote_region must be 1-D, got shape {vote_region.shape}")
        check_packed(vote_region, nbits, "vote_region")




# ---------------------------------------------------------------- reference


def vote_counts(structures: np.ndarray, masks: np.ndarray, nbits: int) -> tuple[U16, U16]:
    """Per element: (voters, ones) = how many structures keep it, how many masks have it set."""
    _check_inputs(structures, masks, nbits, None, 1)
    if structures.shape[0] > np.iinfo(np.uint16).max:
        raise ValueError("vote_counts supports at most 65535 participants")
    bad = bad_rows(structures, masks)
    if bad.size:
        raise_bad_row(int(bad[0]))
    voters = np.zeros(nbits, dtype=np.uint16)
    ones = np.zeros(nbits, dtype=np.uint16)
    for s_row, m_row in zip(structures, masks, strict=True):
        voters += np.unpackbits(s_row, count=nbits)
        ones += np.unpackbits(m_row, count=nbits)
    return voters, ones


def merge_masks_reference(
    structures: np.ndarray,
    masks: np.ndarray,
    nbits: int,
    *,
    vote_region: np.ndarray | None = None,
    min_voters: int = 2,
    count_dtype: type[np.integer] | None = None,
) -> U8:
    """Obviously-correct merge on unpacked bits; the oracle for `merge_masks`, and the naive baseline
    `fedmask bench aggregate` times it against. The rule written the obvious way: unpack every
    participant's bits (one byte per bit), sum them into per-element counts, compare, pack back.

    `count_dtype` is the counts' integer type: numpy's default (int64) unless given. The benchmark's
    "tuned naive" row passes np.uint16 (narrow counts, 4x less memory traffic); the result is the same.
    """
    _check_inputs(structures, masks, nbits, vote_region, min_voters)
    if count_dtype is not None and structures.shape[0] > np.iinfo(count_dtype).max:
        raise ValueError(f"{structures.shape[0]} participants overflow {np.dtype(count_dtype).name} counts")
    bad = bad_rows(structures, masks)
    if bad.size:
        raise_bad_row(int(bad[0]))
    keep = np.unpackbits(structures, axis=1, count=nbits).view(np.bool_)
    own = np.unpackbits(masks, axis=1, count=nbits).view(np.bool_)
    voters = keep.sum(axis=0, dtype=count_dtype)
    ones = own.sum(axis=0, dtype=count_dtype)
    if count_dtype is not None:  # widen before doubling: 2 * ones must not wrap around
        voters, ones = voters.astype(np.int32), ones.astype(np.int32)
    allowed = voters >= min_voters
    if vote_region is not None:
        allowed &= np.unpackbits(vote_region, count=nbits).view(np.bool_)
    up = allowed & (2 * ones > voters)  # majority 1: set, inside the structure only
    down = allowed & (2 * ones < voters)  # majority 0: clear
    out: U8 = np.packbits((own | (keep & up)) & ~down, axis=1)
    return out


# Block widths are tuned for this many devices; more devices get proportionally narrower
# blocks so that a block's rows still fit in cache.
_TUNED_DEVICES = 24


def merge_masks(
    structures: np.ndarray,
    masks: np.ndarray,
    nbits: int,
    *,
    vote_region: np.ndarray | None = None,
    min_voters: int = 2,
    block_bytes: int | None = None,
    compiled: bool | None = None,
) -> U8:
    """Merged masks, one row per device (see module docstring); bit-identical to the reference.

    `block_bytes`: how much of each device's vector one block covers (for up to 24 devices); by
    default 8 kB for the compiled kernel (a block's rows then stay in this machine's 512 kB L2 until
    the output is written: 2-12% faster than 64 kB in interleaved runs) and 64 kB for the numpy one.
    `compiled`: the numba kernel (shared.merge_jit, one pass over the inputs) or this module's numpy
    kernel; by default the numba one when numba is installed and the merge is large enough to pay
    for its one-time compile (merge_jit.pays).
    """
    _check_inputs(structures, masks, nbits, vote_region, min_voters)
    n, nbytes = structures.shape
    out = np.empty((n, nbytes), dtype=np.uint8)
    if nbytes == 0:
        return out
    # A lone voter's majority is its own bit: min_voters 1 and 2 give the same result, and
    # neither needs the voter count checked (elements with no voter are 0 for everyone).
    if max(min_voters, 2) > n:  # nobody can vote: every device keeps its own mask
        bad = bad_rows(structures, masks)
        if bad.size:
            raise_bad_row(int(bad[0]))
        np.copyto(out, masks)
        return out
    threshold = min_voters if min_voters > 2 else 0
    total = -(-nbytes // ALIGN)
    use_jit = merge_jit.pays(n * nbytes) if compiled is None else compiled
    if block_bytes is None:
        block_bytes = 1 << 13 if use_jit else 1 << 16
    bw = max(1, min(block_bytes * min(n, _TUNED_DEVICES) // (n * ALIGN), total))
    if use_jit:
        if not merge_jit.merge_packed(structures, masks, vote_region, threshold, out, bw):
            raise_bad_row(int(bad_rows(structures, masks)[0]))
        return out
    region = None if vote_region is None else Words(vote_region[None, :])
    job = Job(Words(structures), Words(masks), region, Words(out))
    Kernel(n, bw, threshold, region is not None).run(job, 0, total)
    return out
