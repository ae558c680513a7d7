"""Wire codec for FedMask messages: one msgpack map per message, validated field by field both ways.

`decode` treats its input as hostile: it bounds the size, lets msgpack allocate nothing a crafted
header asks for, and then checks every field. Any failure is a `CodecError` whose `reason` is one of
the stable codes below (the pipeline copies it into the dead-letter reason header); `detail` names the
field. `encode` runs the same checks (the field table and the checks are shared/codec_checks.py), so
nothing this module emits is rejected by `decode`; before checking, it turns Python/NumPy numbers into
their field's wire type (an int deadline becomes a float, np.int64 an int). `decode` is strict: the
wire types below, exactly.

Fields (a msgpack map with string keys)
  v         int    PROTOCOL_VERSION; checked before anything else
  type      str    "hello" | "update" | "task" | "mask"
  device    str    1..64 chars of [A-Za-z0-9_.-]
  round     int    0 .. 2**63-1 (hello: the round the device joins at)
  model     str    frozen-weights fingerprint, lowercase hex, 16..64 chars
  layout    str    layout hash, lowercase hex, 16..64 chars
  enc       str    "structure" (only the bits inside the device's structure, in order) | "full" (all bits)
                   | "q4" (mask only: per-element agreement inside the structure, 4 bits each, two
                   per byte, high nibble first; nbits = 4 x elements; see shared/agreement.py)
                   | "delta" (update and mask: the structure's bits coded as their change against a base
                   mask the receiver holds; shared/delta_codec.py has the payload format)
  bits      bin    np.packbits(..., bitorder="big"); len(bits) == ceil(nbits / 8); padding bits are 0
                   (enc "delta": the coded payload, shorter than ceil(nbits / 8))
  nbits     int    number of valid bits in `bits` (enc "delta": in the decoded bits)
  crc32     int    zlib.crc32(bits), as sent
  version   int    mask version: update = the version trained from; task/mask = the aggregator's version
                   of the device's merged mask
  stats     map    optional keys: samples (int >= 0), loss (finite float), accuracy (float 0..1),
                   val_accuracy (float 0..1: the trained mask on the device's own validation split),
                   train_seconds (finite float >= 0)
  deadline  float  unix seconds, finite, >= 0
  base      int    enc "delta" only: what the change is against. update: the merged mask version the
                   device holds (0: the model's initial mask, which every party derives from the model
                   seed); mask: the round of the device's own update that this merged mask is coded against
                   (base = the mask's version), or in the async stream the merged mask version the board
                   holds (base < the mask's version)
  mask_crc32 int   enc "delta" only: zlib.crc32 of the decoded packed bits (a wrong base is detected)
  downlink  str    update, optional: "delta" when the device takes its merged mask delta-coded against
                   this update, "structure" (the default) when it takes the raw bits

Fields per type (every type also has v, type, device, round, model, layout):
  hello    enc bits nbits crc32                     enc must be "full": the bits are the device's structure
  update   enc bits nbits crc32 version [stats]
  task     enc bits nbits crc32 version deadline
  mask     enc bits nbits crc32 version
  with enc "delta" (update and mask), also: base mask_crc32; an update may carry downlink

Reason codes
  too_large        input longer than max_bytes
  undecodable      not exactly one well-formed msgpack object within the limits: truncated, trailing
                   bytes, invalid UTF-8, over-long or over-nested containers, ext types, non-bytes input
  not_a_map        the top-level object is not a map
  bad_version      v is not PROTOCOL_VERSION
  missing_field    a field the type requires is absent
  bad_type         a field has the wrong msgpack type (a bool is never an int, an int never a float)
  bad_value        right type, but out of range or not an allowed value
  unknown_field    a key that is not part of the protocol (also inside stats)
  forbidden_field  a protocol field this message type must not carry
  wrong_type       type is not the one decode(expect_type=...) was told to accept
  bad_length       len(bits) != ceil(nbits / 8) (enc "delta": not shorter than that)
  bad_padding      a padding bit after the last valid bit is set
  bad_crc          crc32 does not match bits
  bad_delta        enc "delta": the payload's header is malformed (shared/delta_codec.py); the receiver,
                   decoding against its base, also raises it for a payload not used up exactly
  bad_base         (receiver) the decoded mask's CRC32 is not mask_crc32: the sender coded against another base
  (A receiver that does not hold the named base refuses with stale_base: shared/rounds.py, shared/device.py.)

Strategy messages (shared/strategies/: FedAvg, FedDST, ZeroFL) are registered here too: types
"stask" | "supdate" | "smodel" | "shello" (STRATEGY_TYPES, encode_strategy / decode_strategy, envelope in
shared/strategy_codec.py), whose tensors travel as payload parts with enc in PAYLOAD_ENCODINGS
(shared/payloads.py): "bits" (packed, as above), "sparse" (values with positions, as a bitmap or an
index list, whichever is smaller per part) and "dense" (float32 or float16). Same reason codes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import msgpack
import numpy as np
import numpy.typing as npt

from shared.codec_checks import ENCODINGS as ENCODINGS
from shared.codec_checks import ORDER as _ORDER
from shared.codec_checks import PROTOCOL_VERSION as PROTOCOL_VERSION
from shared.codec_checks import TYPES as TYPES
from shared.codec_checks import validate
from shared.errors import CodecError
from shared.payloads import PAYLOAD_ENCODINGS as PAYLOAD_ENCODINGS
from shared.strategy_codec import STRATEGY_TYPES as STRATEGY_TYPES
from shared.strategy_codec import StrategyMessage as StrategyMessage
from shared.strategy_codec import decode_strategy as decode_strategy
from shared.strategy_codec import encode_strategy as encode_strategy

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024  # a full mask of a 500M-parameter model is 62.5 MB

MessageType = Literal["hello", "update", "task", "mask"]
Encoding = Literal["structure", "full", "q4", "delta"]
REASONS: Final = (
    "too_large",
    "undecodable",
    "not_a_map",
    "bad_version",
    "missing_field",
    "bad_type",
    "bad_value",
    "unknown_field",
    "forbidden_field",
    "wrong_type",
    "bad_length",
    "bad_padding",
    "bad_crc",
    "bad_delta",
    "bad_base",
)

_MAX_STR_BYTES = 1024  # longest str msgpack may build; the longest legal one is 64 chars
_MAX_CONTAINER = 32  # longest map/array msgpack may build; a message has at most 15 keys


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Training statistics a device may attach to an update; None means "not reported"."""

    samples: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    val_accuracy: float | None = None
    train_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Message:
    """One protocol message; fields a type does not carry are None (see the module docstring)."""

    type: MessageType
    device: str
    round: int
    model: str
    layout: str
    enc: Encoding | None = None
    bits: bytes | None = field(default=None, repr=False)
    nbits: int | None = None
    crc32: int | None = None
    version: int | None = None
    stats: Stats | None = None
    deadline: float | None = None
    base: int | None = None
    mask_crc32: int | None = None
    downlink: Literal["structure", "delta"] | None = None

    def unpack(self) -> npt.NDArray[np.bool_]:
        """The `nbits` valid bits as a bool array."""
        if self.bits is None or self.nbits is None:
            raise CodecError("missing_field", f"{self.type} message carries no bits")
        return unpack_bits(self.bits, self.nbits)


# ---------------------------------------------------------------- public API


def encode(msg: Message) -> bytes:
    """Validate `msg` and pack it; raises CodecError exactly where `decode` would."""
    fields = _to_wire(msg)
    validate(fields)
    packed: bytes = msgpack.packb(fields)
    return packed


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, expect_type: str | None = None) -> Message:
    """Parse and validate untrusted bytes; anything wrong raises CodecError (never a msgpack error)."""
    if expect_type is not None and expect_type not in TYPES:
        raise ValueError(f"expect_type must be one of {TYPES}, not {expect_type!r}")
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError("undecodable", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_bin_len=max_bytes,
            max_str_len=_MAX_STR_BYTES,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except Exception as exc:  # ExtraData, FormatError, StackError, ValueError, ...: all mean the same here
        raise CodecError("undecodable", f"{type(exc).__name__}: {str(exc)[:80]}") from exc
    if type(obj) is not dict:
        raise CodecError("not_a_map", f"top level is {type(obj).__name__}")
    validate(obj, expect_type)
    return _from_wire(obj)


def message_size(msg: Message) -> int:
    """Exactly len(encode(msg)), without copying the bits; validates like `encode`."""
    fields = _to_wire(msg)
    validate(fields)
    bits = fields.pop("bits", None)
    # Removing a key keeps the map header one byte (fixmap holds up to 15 keys; a message has <= 15).
    size = len(msgpack.packb(fields))
    if isinstance(bits, bytes):
        n = len(bits)
        size += len(msgpack.packb("bits")) + (2 if n < 2**8 else 3 if n < 2**16 else 5) + n
    return size


def pack_bits(values: npt.ArrayLike) -> tuple[bytes, int]:
    """A 1-D array of 0/1 (or bool) as (packed bytes, nbits), big-endian bit order, zero padding."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise CodecError("bad_value", f"bits must be a 1-D array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise CodecError("bad_value", "bits must hold only 0 and 1")
        arr = arr.astype(np.bool_)
    return np.packbits(arr, bitorder="big").tobytes(), int(arr.size)


def unpack_bits(bits: bytes, nbits: int) -> npt.NDArray[np.bool_]:
    """Inverse of `pack_bits`."""
    raw = np.frombuffer(bits, dtype=np.uint8)
    return np.unpackbits(raw, count=nbits, bitorder="big").astype(np.bool_)


Bits: TypeAlias = npt.ArrayLike | bytes
"""What the make_* helpers take: a 1-D 0/1 array (packed for you) or already-packed bytes plus nbits."""


def make_hello(
    *, device: str, round: int, model: str, layout: str, structure: Bits, nbits: int | None = None
) -> Message:
    """A device joining at `round`, announcing its structure (all nbits of the model, enc "full")."""
    packed, n, crc = _bits(structure, nbits)
    head = _head(device, round, model, layout)
    return _checked(Message(type="hello", **head, enc="full", bits=packed, nbits=n, crc32=crc))


def make_update(
    *,
    device: str,
    round: int,
    model: str,
    layout: str,
    bits: Bits,
    version: int,
    nbits: int | None = None,
    enc: Encoding = "structure",
    stats: Stats | None = None,
    base: int | None = None,
    mask_crc32: int | None = None,
    downlink: Literal["structure", "delta"] | None = None,
) -> Message:
    """A device's trained mask for `round`, trained from mask `version` (enc "delta": `bits` is the
    payload, `nbits` the decoded bit count; shared/delta_codec.code_mask gives enc, bits, base, mask_crc32)."""
    packed, n, crc = _bits(bits, nbits)
    head = _head(device, round, model, layout)
    return _checked(
        Message(type="update", **head, enc=enc, bits=packed, nbits=n, crc32=crc, version=version, stats=stats,
                base=base, mask_crc32=mask_crc32, downlink=downlink)
    )


def make_task(
    *,
    device: str,
    round: int,
    model: str,
    layout: str,
    bits: Bits,
    version: int,
    deadline: float,
    nbits: int | None = None,
    enc: Encoding = "structure",
) -> Message:
    """The aggregator asking a device to train `round` from its merged mask `version` before `deadline`."""
    packed, n, crc = _bits(bits, nbits)
    head = _head(device, round, model, layout)
    return _checked(
        Message(
            type="task", **head, enc=enc, bits=packed, nbits=n, crc32=crc, version=version, deadline=deadline
        )
    )


def make_mask(
    *,
    device: str,
    round: int,
    model: str,
    layout: str,
    bits: Bits,
    version: int,
    nbits: int | None = None,
    enc: Encoding = "structure",
    base: int | None = None,
    mask_crc32: int | None = None,
) -> Message:
    """The aggregator's merged mask `version` for a device (enc "delta": as in `make_update`)."""
    packed, n, crc = _bits(bits, nbits)
    head = _head(device, round, model, layout)
    return _checked(Message(type="mask", **head, enc=enc, bits=packed, nbits=n, crc32=crc, version=version,
                            base=base, mask_crc32=mask_crc32))


# ---------------------------------------------------------------- conversion


def _bits(bits: Bits, nbits: int | None) -> tuple[bytes, int, int]:
    if isinstance(bits, (bytes, bytearray, memoryview)):
        if nbits is None:
            raise CodecError("missing_field", "nbits is required with packed bits")
        packed = bytes(bits)
    else:
        packed, counted = pack_bits(bits)
        if nbits is not None and nbits != counted:
            raise CodecError("bad_value", f"nbits={nbits} but the array has {counted} bits")
        nbits = counted
    return packed, nbits, zlib.crc32(packed)


def _head(device: str, round: int, model: str, layout: str) -> dict[str, Any]:
    return {"device": device, "round": round, "model": model, "layout": layout}


def _checked(msg: Message) -> Message:
    validate(_to_wire(msg))
    return msg


_FLOAT_FIELDS = frozenset({"deadline", "loss", "accuracy", "val_accuracy", "train_seconds"})


def _wire_scalar(name: str, value: object) -> object:
    """Python or NumPy numbers become their field's wire type; bools stay bools (and get rejected)."""
    if isinstance(value, (bool, np.bool_)):
        return value
    if name in _FLOAT_FIELDS and isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _to_wire(msg: Message) -> dict[str, Any]:
    fields: dict[str, Any] = {"v": PROTOCOL_VERSION}
    for name in _ORDER[1:]:
        value = getattr(msg, name)
        if isinstance(value, Stats):
            value = {k: _wire_scalar(k, x) for k, x in vars(value).items() if x is not None}
        if value is not None:
            fields[name] = _wire_scalar(name, value)
    return fields


def _from_wire(fields: Mapping[str, Any]) -> Message:
    kwargs = {k: v for k, v in fields.items() if k != "v"}
    if "stats" in kwargs:
        kwargs["stats"] = Stats(**kwargs["stats"])
    return Message(**kwargs)
