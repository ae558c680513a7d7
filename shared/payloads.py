"""Tensor payloads of strategy messages: one `Part` per named tensor (or tensor slice) on the wire.

Encodings (the `enc` of a part; registered in shared/codec.py as PAYLOAD_ENCODINGS):
  bits    n bits, packed big-endian (np.packbits), zero padding: a mask, or a mask's change (XOR)
  dense   n values, little-endian float32 ("f32") or IEEE float16 ("f16")
  sparse  k of n entries: their positions (`pos`) and, unless dtype is "none", their values in
          position order. Positions travel as a bitmap (n bits, "bitmap") or as an index list
          (k little-endian uint16 "index16" when n <= 65536, else uint32 "index32"), whichever is
          smaller for this part: `sparse_part` chooses per part, so per message.

Every part carries crc32 = zlib.crc32(pos + values). Decoding is strict: sizes must match n, k and
the widths exactly, bitmap padding bits are 0, indices strictly increase below n, the bitmap holds
exactly k ones, and every value is finite (a NaN or inf weight would poison an average).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import CodecError

PAYLOAD_ENCODINGS: Final = ("bits", "dense", "sparse")
DTYPES: Final[dict[str, np.dtype[np.floating[Any]]]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
POSITIONS: Final = ("bitmap", "index16", "index32")
MAX_ELEMENTS: Final = 2**31 - 1
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_FIELDS: Final = frozenset({"name", "enc", "n", "k", "dtype", "pos_enc", "pos", "values", "crc32"})
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, kw_only=True)
class Part:
    name: str
    enc: str
    n: int
    values: bytes = field(default=b"", repr=False)
    dtype: str | None = None      # dense / sparse: "f32" | "f16"; sparse positions only: "none"
    k: int | None = None          # sparse: number of entries
    pos_enc: str | None = None    # sparse: "bitmap" | "index16" | "index32"
    pos: bytes = field(default=b"", repr=False)

    @property
    def crc32(self) -> int:
        return zlib.crc32(self.pos + self.values)

    # -- reading (a decoded part is already validated) ------------------------------------
    def bits(self) -> npt.NDArray[np.bool_]:
        _expect(self, "bits")
        return np.unpackbits(np.frombuffer(self.values, np.uint8), count=self.n, bitorder="big").astype(bool)

    def positions(self) -> npt.NDArray[np.int64]:
        _expect(self, "sparse")
        if self.pos_enc == "bitmap":
            bm = np.unpackbits(np.frombuffer(self.pos, np.uint8), count=self.n, bitorder="big")
            return np.flatnonzero(bm).astype(np.int64)
        width = "<u2" if self.pos_enc == "index16" else "<u4"
        return np.frombuffer(self.pos, width).astype(np.int64)

    def array(self) -> F32:
        """dense: the n values; sparse: the k values in position order (float32)."""
        if self.enc not in ("dense", "sparse") or self.dtype not in DTYPES:
            raise CodecError("bad_value", f"part {self.name} ({self.enc}) carries no values")
        return np.frombuffer(self.values, DTYPES[self.dtype]).astype(np.float32)

    def full(self) -> F32:
        """The whole tensor as n float32 values (sparse: zeros where no entry was sent)."""
        if self.enc == "dense":
            return self.array()
        out = np.zeros(self.n, np.float32)
        out[self.positions()] = self.array()
        return out

    def nbytes(self) -> int:
        return len(self.pos) + len(self.values)


def _expect(part: Part, enc: str) -> None:
    if part.enc != enc:
        raise CodecError("bad_value", f"part {part.name} is {part.enc}, not {enc}")


# ---------------------------------------------------------------- building


def bits_part(name: str, bits: npt.ArrayLike) -> Part:
    arr = np.asarray(bits, dtype=bool).reshape(-1)
    return Part(name=name, enc="bits", n=int(arr.size), values=np.packbits(arr, bitorder="big").tobytes())


def dense_part(name: str, values: npt.ArrayLike, dtype: str = "f32") -> Part:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    return Part(name=name, enc="dense", n=int(arr.size), dtype=dtype, values=_values(arr, dtype))


def sparse_part(name: str, n: int, positions: npt.ArrayLike, values: npt.ArrayLike | None = None,
                dtype: str = "f32") -> Part:
    """k entries of an n-element tensor; positions as a bitmap or an index list, whichever is smaller.
    values=None: positions only (dtype "none"). Positions are sorted here; values follow them."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if pos.size and (pos[0] < 0 or pos[-1] >= n or np.any(np.diff(pos) <= 0)):
        raise CodecError("bad_value", f"part {name}: positions must be distinct and in 0..{n - 1}")
    k = int(pos.size)
    width = 2 if n <= 2**16 else 4
    if (n + 7) // 8 <= k * width:
        bm = np.zeros(n, bool)
        bm[pos] = True
        pos_enc, raw = "bitmap", np.packbits(bm, bitorder="big").tobytes()
    else:
        pos_enc = "index16" if width == 2 else "index32"
        raw = pos.astype("<u2" if width == 2 else "<u4").tobytes()
    if values is None:
        return Part(name=name, enc="sparse", n=n, k=k, dtype="none", pos_enc=pos_enc, pos=raw)
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    if vals.size != k:
        raise CodecError("bad_value", f"part {name}: {vals.size} values for {k} positions")
    return Part(name=name, enc="sparse", n=n, k=k, dtype=dtype, pos_enc=pos_enc, pos=raw,
                values=_values(vals[order], dtype))


def _values(arr: np.ndarray, dtype: str) -> bytes:
    if dtype not in DTYPES:
        raise CodecError("bad_value", f"dtype {dtype!r} not one of {tuple(DTYPES)}")
    out = arr.astype(DTYPES[dtype])
    if not np.isfinite(out).all():
        raise CodecError("bad_value", f"non-finite value as {dtype}")
    raw: bytes = out.tobytes()
    return raw


# ---------------------------------------------------------------- wire


def part_to_wire(p: Part) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "enc": p.enc, "n": p.n}
    for key in ("k", "dtype", "pos_enc"):
        if getattr(p, key) is not None:
            out[key] = getattr(p, key)
    if p.pos:
        out["pos"] = p.pos
    out["values"] = p.values
    out["crc32"] = p.crc32
    return out


def part_from_wire(raw: object) -> Part:
    """Validate one untrusted part map; CodecError with a stable reason on anything wrong."""
    if type(raw) is not dict:
        raise CodecError("bad_type", f"part: expected map, got {type(raw).__name__}")
    if unknown := [k for k in raw if k not in _FIELDS]:
        raise CodecError("unknown_field", f"part.{str(unknown[0])[:32]!r}")
    name = _get(raw, "name", str)
    if not _NAME_RE.fullmatch(name):
        raise CodecError("bad_value", f"part name {name[:32]!r}")
    enc, n = _get(raw, "enc", str), _get(raw, "n", int)
    values, crc = _get(raw, "values", bytes), _get(raw, "crc32", int)
    if enc not in PAYLOAD_ENCODINGS:
        raise CodecError("bad_value", f"part {name}: enc {enc[:16]!r} not one of {PAYLOAD_ENCODINGS}")
    if not 0 <= n <= MAX_ELEMENTS:
        raise CodecError("bad_value", f"part {name}: n={n}")
    base = {"name", "enc", "n", "values", "crc32"}
    allowed = {"bits": base, "dense": base | {"dtype"}}
    if enc in allowed and (extra := set(raw) - allowed[enc]):
        raise CodecError("forbidden_field", f"part {name}: {min(extra)} with enc {enc}")
    if enc == "bits":
        _check_bitmap(values, n, name)
        part = Part(name=name, enc=enc, n=n, values=values)
    elif enc == "dense":
        dtype = _get(raw, "dtype", str)
        _check_values(values, n, dtype, name)
        part = Part(name=name, enc=enc, n=n, dtype=dtype, values=values)
    else:
        part = _sparse_from_wire(raw, name, n, values)
    if type(crc) is not int or part.crc32 != crc:
        raise CodecError("bad_crc", f"part {name}: crc32 does not match")
    return part


def _sparse_from_wire(raw: Mapping[str, Any], name: str, n: int, values: bytes) -> Part:
    k, dtype, pos_enc = _get(raw, "k", int), _get(raw, "dtype", str), _get(raw, "pos_enc", str)
    pos = raw.get("pos", b"")
    if type(pos) is not bytes:
        raise CodecError("bad_type", f"part {name}: pos is not bin")
    if not 0 <= k <= n:
        raise CodecError("bad_value", f"part {name}: k={k} not in 0..{n}")
    if pos_enc not in POSITIONS:
        raise CodecError("bad_value", f"part {name}: pos_enc {pos_enc[:16]!r} not one of {POSITIONS}")
    if pos_enc == "bitmap":
        ones = _check_bitmap(pos, n, name)
        if ones != k:
            raise CodecError("bad_value", f"part {name}: bitmap holds {ones} entries, k={k}")
    else:
        width = 2 if pos_enc == "index16" else 4
        if pos_enc == "index16" and n > 2**16:
            raise CodecError("bad_value", f"part {name}: index16 cannot address n={n}")
        if len(pos) != k * width:
            raise CodecError("bad_length", f"part {name}: {len(pos)} position bytes for k={k}")
        idx = np.frombuffer(pos, "<u2" if width == 2 else "<u4").astype(np.int64)
        if idx.size and (idx[-1] >= n or np.any(np.diff(idx) <= 0)):
            raise CodecError("bad_value", f"part {name}: indices not strictly increasing below n")
    if dtype == "none":
        if values:
            raise CodecError("bad_length", f"part {name}: values with dtype none")
    else:
        _check_values(values, k, dtype, name)
    return Part(name=name, enc="sparse", n=n, k=k, dtype=dtype, pos_enc=pos_enc, pos=pos, values=values)


def _check_bitmap(data: bytes, n: int, name: str) -> int:
    if len(data) != (n + 7) // 8:
        raise CodecError("bad_length", f"part {name}: {len(data)} bytes for {n} bits")
    tail = n % 8
    if tail and data[-1] & (0xFF >> tail):
        raise CodecError("bad_padding", f"part {name}: padding bits are not zero")
    return int(np.unpackbits(np.frombuffer(data, np.uint8)).sum())


def _check_values(data: bytes, count: int, dtype: str, name: str) -> None:
    if dtype not in DTYPES:
        raise CodecError("bad_value", f"part {name}: dtype {dtype[:16]!r} not one of {tuple(DTYPES)}")
    if len(data) != count * DTYPES[dtype].itemsize:
        raise CodecError("bad_length", f"part {name}: {len(data)} bytes for {count} {dtype} values")
    if not np.isfinite(np.frombuffer(data, DTYPES[dtype])).all():
        raise CodecError("bad_value", f"part {name}: a value is not finite")


def _get(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in raw:
        raise CodecError("missing_field", f"part.{key}")
    value = raw[key]
    if type(value) is not kind:  # a bool is never an int
        raise CodecError("bad_type", f"part.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value
