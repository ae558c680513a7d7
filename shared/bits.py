"""Bit-vector conventions shared by every module that touches masks.

A model's masks are flattened into one bit vector of length P (``nbits``) and packed
big-endian within each byte (``np.packbits`` default) into ``ceil(P / 8)`` uint8 bytes.
The padding bits after position P are always 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
Bool = npt.NDArray[np.bool_]

# numpy >= 2.0 has a native popcount ufunc; 1.26 (allowed by pyproject) does not.
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
_POPCOUNT_LUT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def nbytes_for(nbits: int) -> int:
    """Number of packed bytes holding ``nbits`` bits."""
    if nbits < 0:
        raise ValueError(f"nbits must be >= 0, got {nbits}")
    return (nbits + 7) // 8


def pad_mask(nbits: int) -> int:
    """Byte mask of the valid bits in the last packed byte (0xFF when there is no padding)."""
    rem = nbits % 8
    return 0xFF if rem == 0 else (0xFF << (8 - rem)) & 0xFF


def check_packed(packed: np.ndarray, nbits: int, name: str = "packed") -> U8:
    """Validate a packed vector (or a stack of them, last axis) and return it as uint8."""
    if packed.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {packed.dtype}")
    if packed.ndim < 1 or packed.shape[-1] != nbytes_for(nbits):
        raise ValueError(
            f"{name} has {packed.shape[-1] if packed.ndim else 0} bytes per vector, "
            f"expected ceil({nbits}/8) = {nbytes_for(nbits)}"
        )
    mask = pad_mask(nbits)
    if mask != 0xFF and np.any(packed[..., -1] & (~mask & 0xFF)):
        raise ValueError(f"{name} has nonzero padding bits after bit {nbits}")
    return packed


def pack(bits: np.ndarray) -> U8:
    """Pack a 1-D bool/0-1 vector into big-endian bytes (padding bits are 0)."""
    if bits.ndim != 1:
        raise ValueError(f"pack expects a 1-D bit vector, got shape {bits.shape}")
    if bits.dtype != np.bool_ and not np.all((bits == 0) | (bits == 1)):
        raise ValueError("pack expects only 0/1 values")
    return np.packbits(bits.astype(np.bool_, copy=False), bitorder="big")


def unpack(packed: np.ndarray, nbits: int) -> Bool:
    """Inverse of :func:`pack`: the first ``nbits`` bits as a bool vector."""
    check_packed(packed, nbits)
    if packed.ndim != 1:
        raise ValueError(f"unpack expects a 1-D byte vector, got shape {packed.shape}")
    return np.unpackbits(packed, count=nbits, bitorder="big").view(np.bool_)


def popcount(packed: np.ndarray) -> int:
    """Number of 1 bits in a packed uint8 array of any shape."""
    if packed.dtype != np.uint8:
        raise ValueError(f"popcount expects uint8, got {packed.dtype}")
    flat = np.ascontiguousarray(packed).reshape(-1)
    if _HAS_BITWISE_COUNT:
        # Count on 8-byte words where possible: fewer elements, same result.
        whole = flat.size - flat.size % 8
        total = int(np.bitwise_count(flat[:whole].view(np.uint64)).sum(dtype=np.int64))
        return total + int(np.bitwise_count(flat[whole:]).sum(dtype=np.int64))
    return int(_POPCOUNT_LUT[flat].sum(dtype=np.int64))


def select(mask_packed: np.ndarray, structure_packed: np.ndarray, nbits: int) -> U8:
    """The mask's bits at positions where the structure is 1, packed (length = popcount(structure))."""
    mask_bits = unpack(check_packed(mask_packed, nbits, "mask"), nbits)
    keep = unpack(check_packed(structure_packed, nbits, "structure"), nbits)
    return np.packbits(mask_bits[keep], bitorder="big")


def scatter(selected_packed: np.ndarray, structure_packed: np.ndarray, nbits: int) -> U8:
    """Inverse of :func:`select`: a full-length packed mask, 0 outside the structure."""
    keep = unpack(check_packed(structure_packed, nbits, "structure"), nbits)
    kept = int(np.count_nonzero(keep))
    inner = unpack(check_packed(selected_packed, kept, "selected"), kept)
    full = np.zeros(nbits, dtype=np.bool_)
    full[keep] = inner
    return np.packbits(full, bitorder="big")


def positions(structure_packed: np.ndarray, nbits: int) -> np.ndarray:
    """Indices of the structure's 1 bits: computed once per device, it makes select/scatter a gather.
    int32 (models stay far below 2**31 parameters): the aggregator keeps one per enrolled device."""
    bits = unpack(check_packed(structure_packed, nbits, "structure"), nbits)
    return np.flatnonzero(bits).astype(np.int32)


@dataclass(frozen=True)
class Spans:
    """A structure's :func:`positions` as a byte-aligned common prefix, long contiguous runs and the
    scattered rest. An unpruned layer is one run (80% of the positions of the 1M-parameter activity
    mlp; the first layer, so also the prefix): selecting or scattering it is a copy of bytes or a slice,
    where an index gather or scatter cost about 4 ms per device, the largest part of a round's close at
    1,000 devices (docs/results.md, issue 14).

    prefix: the first `prefix` positions are 0..prefix-1 (a multiple of 8), so those bits are the same
    bytes in the full and the selected vector. runs and rest_* are over the rest, counted from there."""

    nbits: int
    count: int  # number of positions (the selected vector's length)
    prefix: int
    runs: tuple[tuple[int, int, int], ...]  # (start in the full vector, start in the selected, length)
    rest_full: np.ndarray  # int32: the other positions, in the full vector ...
    rest_selected: np.ndarray  # ... and where they sit in the selected vector


def spans(where: np.ndarray, nbits: int, min_run: int = 4096) -> Spans:
    """:class:`Spans` of sorted positions; runs shorter than `min_run` stay in the scattered rest."""
    off = np.flatnonzero(where != np.arange(len(where)))
    prefix = (int(off[0]) if len(off) else len(where)) // 8 * 8
    tail = where[prefix:] - prefix
    if len(tail) == 0:
        empty = np.zeros(0, np.int32)
        return Spans(nbits, len(where), prefix, (), empty, empty)
    breaks = np.flatnonzero(np.diff(tail) != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(tail)]
    long = (ends - starts) >= min_run
    rest = np.ones(len(tail), dtype=np.bool_)
    runs = []
    for a, b in zip(starts[long].tolist(), ends[long].tolist(), strict=True):
        runs.append((int(tail[a]), a, b - a))
        rest[a:b] = False
    rest_selected = np.flatnonzero(rest).astype(np.int32)
    return Spans(nbits, len(where), prefix, tuple(runs), tail[rest_selected].astype(np.int32), rest_selected)


def select_spans(mask_packed: np.ndarray, sp: Spans) -> U8:
    """:func:`select_at` with the positions given as :class:`Spans` (the same result)."""
    p = sp.prefix // 8
    bits = unpack(check_packed(mask_packed, sp.nbits, "mask")[p:], sp.nbits - sp.prefix)
    out = np.empty(sp.count - sp.prefix, dtype=np.bool_)
    for a, c, n in sp.runs:
        out[c:c + n] = bits[a:a + n]
    out[sp.rest_selected] = bits[sp.rest_full]
    return np.concatenate([mask_packed[:p], np.packbits(out, bitorder="big")])


def scatter_spans(selected_packed: np.ndarray, sp: Spans) -> U8:
    """:func:`scatter_at` with the positions given as :class:`Spans` (the same result)."""
    p = sp.prefix // 8
    selected = unpack(check_packed(selected_packed, sp.count, "selected")[p:], sp.count - sp.prefix)
    full = np.zeros(sp.nbits - sp.prefix, dtype=np.bool_)
    for a, c, n in sp.runs:
        full[a:a + n] = selected[c:c + n]
    full[sp.rest_full] = selected[sp.rest_selected]
    return np.concatenate([selected_packed[:p], np.packbits(full, bitorder="big")])


def select_at(mask_packed: np.ndarray, where: np.ndarray, nbits: int) -> U8:
    """:func:`select` with the structure given as :func:`positions` (same result, ~4x faster at 1M bits)."""
    return np.packbits(unpack(check_packed(mask_packed, nbits, "mask"), nbits)[where], bitorder="big")


def scatter_at(selected_packed: np.ndarray, where: np.ndarray, nbits: int) -> U8:
    """:func:`scatter` with the structure given as :func:`positions`."""
    full = np.zeros(nbits, dtype=np.bool_)
    full[where] = unpack(check_packed(selected_packed, len(where), "selected"), len(where))
    return np.packbits(full, bitorder="big")
