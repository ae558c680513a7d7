"""Delta-coded masks: a mask sent as its change (XOR) against a base mask the receiver already holds,
range-coded with constriction; per message, whichever is smaller of that and the raw bits is sent.

Why: between rounds a device's mask changes in 1 to 5% of its structure's bits (docs/results.md,
"Delta-coded updates"), so coding the change costs a fraction of the raw bit per element. The coding
is lossless: the receiver rebuilds exactly the mask the sender holds, and a CRC32 of that decoded mask
travels with the message, so a change applied to the wrong base is detected, never merged.

Payload (the message's `bits` when enc is "delta"; integers big-endian unless said)
  offset  size  field
  0       1     format, DELTA_FORMAT (1)
  1       1     S, the number of segments, 1..MAX_SEGMENTS
  2       8*S   per segment: symbols (uint32), q0 (uint16), q1 (uint16)
  2+8*S   4*W   the range coder's compressed words (uint32, little-endian), W >= 0

The change is flips = new XOR base, packed as masks are (big-endian bits, ceil(nbits/8) bytes, padding
0). Every byte of flips is one symbol; the segments cover the bytes in order, and their symbol counts
add up to ceil(nbits/8) exactly. Inside a segment a bit flips with probability q0/65536 where its base
bit is 0 and q1/65536 where it is 1, independently, so a byte's model is the product over its 8 bits
and depends on the base byte (up to 256 models per segment). Coding order: segment by segment, and
inside a segment by base byte value, ascending, each group in position order, so each group is coded
with one fixed model (eight times fewer symbols than coding bits, and a vectorised call per group);
the decoder derives the same order from the base it holds.

The encoder cuts segments where the layers meet (flip rates differ by layer: on MNIST 0.5% in the
first layer, 10% in the pruned ones) and sets q0, q1 from each segment's own counts (two passes:
count, then code). Decoding is bounded by the receiver's own nbits: it decodes exactly ceil(nbits/8)
symbols, allocates nothing a header asks for, and rejects a payload the coder did not use up.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import constriction
import numpy as np
import numpy.typing as npt

from shared.bits import popcount
from shared.errors import CodecError

DELTA_FORMAT: Final = 1
MAX_SEGMENTS: Final = 64
HEADER_BYTES: Final = 2
SEGMENT_BYTES: Final = 8
_Q_ONE: Final = 65536  # probabilities are q / 65536 with q in 1..65535: never 0 or 1
_SEGMENT = struct.Struct(">IHH")
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.intp)

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Coded:
    """How a mask goes on the wire: raw (enc "structure", base and mask_crc32 None) or as a change."""

    enc: Literal["structure", "delta"]
    bits: bytes
    base: int | None = None
    mask_crc32: int | None = None


def code_mask(new: bytes, nbits: int, base: bytes | None, base_id: int,
              segments: Sequence[int] | None = None) -> Coded:
    """`new` (packed, nbits bits) as a change against `base` when that is smaller than `new` itself,
    else raw. base None: no base is shared, raw. `segments`: symbols (bytes) per segment, e.g. from
    `layer_segments`; None is one segment."""
    nbytes = (nbits + 7) // 8
    if base is None or nbytes == 0:
        return Coded("structure", new)
    if len(new) != nbytes or len(base) != nbytes:
        raise ValueError(f"new and base must be {nbytes} bytes for {nbits} bits, got {len(new)} and {len(base)}")
    payload = encode_change(new, base, nbits, segments)
    if len(payload) >= nbytes:
        return Coded("structure", new)  # coding does not pay
    return Coded("delta", payload, base_id, zlib.crc32(new))


def encode_change(new: bytes, base: bytes, nbits: int, segments: Sequence[int] | None = None) -> bytes:
    """The payload coding new XOR base (see the module docstring)."""
    nbytes = (nbits + 7) // 8
    cuts = list(segments) if segments is not None else [nbytes]
    if sum(cuts) != nbytes or any(c <= 0 for c in cuts) or not 1 <= len(cuts) <= MAX_SEGMENTS:
        raise ValueError(f"segments {cuts[:8]}... must be 1..{MAX_SEGMENTS} positive sizes adding up to {nbytes}")
    b = np.frombuffer(base, dtype=np.uint8)
    flips = np.frombuffer(new, dtype=np.uint8) ^ b
    head = [bytes((DELTA_FORMAT, len(cuts)))]
    encoder = constriction.stream.queue.RangeEncoder()
    start = 0
    for size in cuts:
        seg_base, seg_flips = b[start:start + size], flips[start:start + size]
        q0, q1 = _probability(seg_flips & ~seg_base, 8 * size - popcount(seg_base)), \
            _probability(seg_flips & seg_base, popcount(seg_base))
        head.append(_SEGMENT.pack(size, q0, q1))
        for model, symbols in _symbol_groups(seg_base, q0, q1, seg_flips):
            encoder.encode(symbols, model)
        start += size
    words = np.asarray(encoder.get_compressed(), dtype="<u4")
    return b"".join(head) + words.tobytes()


def decode_change(payload: bytes, base: bytes, nbits: int, mask_crc32: int) -> bytes:
    """The packed mask `payload` codes against `base`; CodecError "bad_delta" for a payload that is
    malformed, invalid under the base's models or not used up exactly, "bad_base" when the result's
    CRC32 is not `mask_crc32` (the sender coded against another base: one of the two, either way)."""
    nbytes = (nbits + 7) // 8
    if len(base) != nbytes:
        raise ValueError(f"base must be {nbytes} bytes for {nbits} bits, got {len(base)}")
    cuts, words = check_payload(payload, nbits)
    b = np.frombuffer(base, dtype=np.uint8)
    flips = np.empty(nbytes, dtype=np.uint8)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        start = 0
        for size, q0, q1 in cuts:
            seg_base = b[start:start + size]
            order = np.argsort(seg_base, kind="stable")
            out, at = np.empty(size, dtype=np.uint8), 0
            for model, count in _count_groups(seg_base, q0, q1):
                out[at:at + count] = decoder.decode(model, count)
                at += count
            flips[start + order] = out
            start += size
        used_up = decoder.maybe_exhausted()
    except (AssertionError, ValueError, RuntimeError, OverflowError) as exc:  # constriction's, on invalid data
        raise CodecError("bad_delta", f"range decoder: {str(exc)[:80]}") from exc
    if not used_up:
        raise CodecError("bad_delta", "compressed words left over after the last symbol")
    new = (flips ^ b).tobytes()
    if nbits % 8 and new[-1] & (0xFF >> (nbits % 8)):
        raise CodecError("bad_delta", f"decoded padding bits after bit {nbits} are not zero")
    actual = zlib.crc32(new)
    if actual != mask_crc32:
        raise CodecError("bad_base", f"decoded mask hashes to {actual}, the sender's to {mask_crc32}: another base")
    return new


def check_payload(payload: bytes, nbits: int) -> tuple[list[tuple[int, int, int]], npt.NDArray[np.uint32]]:
    """The header's segments as (symbols, q0, q1) and the compressed words, or CodecError "bad_delta";
    needs no base, so the message codec runs it on every delta message it decodes."""
    nbytes = (nbits + 7) // 8
    if len(payload) < HEADER_BYTES or payload[0] != DELTA_FORMAT:
        raise CodecError("bad_delta", f"payload does not start with format {DELTA_FORMAT}")
    count = payload[1]
    end = HEADER_BYTES + SEGMENT_BYTES * count
    if not 1 <= count <= MAX_SEGMENTS or len(payload) < end or (len(payload) - end) % 4:
        raise CodecError("bad_delta", f"{count} segments in {len(payload)} bytes (1..{MAX_SEGMENTS}, whole words)")
    cuts = [_SEGMENT.unpack_from(payload, HEADER_BYTES + SEGMENT_BYTES * i) for i in range(count)]
    if sum(c[0] for c in cuts) != nbytes or any(c[0] == 0 or c[1] == 0 or c[2] == 0 for c in cuts):
        raise CodecError("bad_delta", f"segments must cover exactly {nbytes} symbols with q in 1..65535")
    return cuts, np.frombuffer(payload, dtype="<u4", offset=end).astype(np.uint32)


def layer_segments(where: npt.NDArray[np.integer], layer_sizes: Sequence[int]) -> list[int]:
    """Symbols per segment for a structure's bits (`where`: positions of its 1 bits in the full mask),
    cut at the byte where each layer's bits begin; empty segments are dropped."""
    nbytes = (len(where) + 7) // 8
    starts = np.searchsorted(where, np.cumsum(list(layer_sizes))[:-1])
    cuts = sorted({0, nbytes, *(int(s) // 8 for s in starts if s < len(where))})
    sizes = [b - a for a, b in itertools.pairwise(cuts) if b > a]
    while len(sizes) > MAX_SEGMENTS:  # never for this project's models; keep the format's bound anyway
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def _probability(flipped: U8, bits: int) -> int:
    """q of a flip among `bits` bits of which popcount(flipped) flipped, clipped to 1..65535."""
    p = (popcount(flipped) + 0.5) / (bits + 1)
    return min(_Q_ONE - 1, max(1, round(p * _Q_ONE)))


def _count_groups(seg_base: U8, q0: int, q1: int) -> list[tuple[Any, int]]:
    """(model, symbol count) per base byte value present in the segment, ascending: the coding order."""
    counts = np.bincount(seg_base, minlength=256)
    present = np.flatnonzero(counts)
    return [(model, int(counts[v])) for model, v in zip(_byte_models(q0, q1, present), present, strict=True)]


def _symbol_groups(seg_base: U8, q0: int, q1: int, seg_flips: U8) -> list[tuple[Any, npt.NDArray[np.int32]]]:
    """(model, symbols) in the order of `_count_groups`: flip bytes grouped by their base byte."""
    ordered = seg_flips[np.argsort(seg_base, kind="stable")].astype(np.int32)
    groups, at = [], 0
    for model, count in _count_groups(seg_base, q0, q1):
        groups.append((model, ordered[at:at + count]))
        at += count
    return groups


def _byte_models(q0: int, q1: int, base_values: npt.NDArray[np.intp]) -> list[Any]:
    """For each base byte value b, the categorical model of its flip byte f:
    P(f | b) = p0^|f & ~b| (1-p0)^|~f & ~b| p1^|f & b| (1-p1)^|~f & b|. Powers come from repeated
    multiplication and the four factors are multiplied in a fixed order (elementwise float64, no libm
    pow, no reductions), so the encoder and the decoder build bit-identical models on any platform."""
    b = base_values.astype(np.uint8)[:, None]
    f = np.arange(256, dtype=np.uint8)[None, :]
    ones_b = _POPCOUNT[b]
    flips_at_1 = _POPCOUNT[f & b]  # bits with base 1 that flip
    flips_at_0 = _POPCOUNT[f & ~b]  # bits with base 0 that flip
    tables = [_powers(x) for x in (q0 / _Q_ONE, 1.0 - q0 / _Q_ONE, q1 / _Q_ONE, 1.0 - q1 / _Q_ONE)]
    probs = tables[0][flips_at_0] * tables[1][8 - ones_b - flips_at_0] \
        * tables[2][flips_at_1] * tables[3][ones_b - flips_at_1]
    categorical = constriction.stream.model.Categorical
    return [categorical(row, perfect=False) for row in probs]


def _powers(x: float) -> npt.NDArray[np.float64]:
    """x**0 .. x**8 by repeated multiplication."""
    out = np.ones(9)
    for k in range(1, 9):
        out[k] = out[k - 1] * x
    return out
