"""The codec's field table and its checks: everything `shared.codec.decode` enforces on a decoded
map, and `encode` on an outgoing one (the protocol itself is described in shared/codec.py).

Kept apart from the codec's conversions because this is the part that faces hostile input: each
check looks at the exact wire type first (a bool is never an int, an int never a float), then the
value, and raises a CodecError with a stable reason code and a detail that renders the value safely.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Final

from shared.delta_codec import check_payload
from shared.errors import CodecError

PROTOCOL_VERSION: Final = 1
TYPES: Final = ("hello", "update", "task", "mask")
ENCODINGS: Final = ("structure", "full", "q4", "delta")

_MAX_INT = 2**63 - 1
_MAX_CRC = 2**32 - 1
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]{16,64}")

_COMMON = ("v", "type", "device", "round", "model", "layout")
_BITS_FIELDS = ("enc", "bits", "nbits", "crc32")
_REQUIRED: Final[Mapping[str, frozenset[str]]] = {
    "hello": frozenset(_COMMON + _BITS_FIELDS),
    "update": frozenset((*_COMMON, *_BITS_FIELDS, "version")),
    "task": frozenset((*_COMMON, *_BITS_FIELDS, "version", "deadline")),
    "mask": frozenset((*_COMMON, *_BITS_FIELDS, "version")),
}
_DELTA_FIELDS = ("base", "mask_crc32")  # required with enc "delta", forbidden otherwise
_OPTIONAL: Final[Mapping[str, frozenset[str]]] = {
    "update": frozenset({"stats", "downlink", *_DELTA_FIELDS}),
    "mask": frozenset(_DELTA_FIELDS),
}
# Wire order of the keys; bits go last so a message's header is a readable prefix.
ORDER: Final = (*_COMMON, "enc", "nbits", "crc32", "version", "stats", "deadline", *_DELTA_FIELDS, "downlink",
                "bits")

Check = Callable[[str, object], None]


def _show(value: object) -> str:
    """A short, safe rendering of a hostile value for an error detail."""
    if isinstance(value, (bool, int, float)):
        return repr(value)[:40]
    if isinstance(value, str):
        return repr(value[:32])
    return type(value).__name__


def _bad_type(name: str, value: object, want: str) -> CodecError:
    return CodecError("bad_type", f"{name}: expected {want}, got {type(value).__name__}")


def _uint(hi: int) -> Check:
    def check(name: str, value: object) -> None:
        if type(value) is not int:
            raise _bad_type(name, value, "int")
        if not 0 <= value <= hi:
            raise CodecError("bad_value", f"{name}={_show(value)} not in 0..{hi}")

    return check


def _float(lo: float = -math.inf, hi: float = math.inf) -> Check:
    def check(name: str, value: object) -> None:
        if type(value) is not float:
            raise _bad_type(name, value, "float")
        if not (math.isfinite(value) and lo <= value <= hi):
            raise CodecError("bad_value", f"{name}={_show(value)} not finite in [{lo}, {hi}]")

    return check


def _text(pattern: re.Pattern[str], what: str) -> Check:
    def check(name: str, value: object) -> None:
        if type(value) is not str:
            raise _bad_type(name, value, "str")
        if not pattern.fullmatch(value):
            raise CodecError("bad_value", f"{name}={_show(value)} is not {what}")

    return check


def _choice(allowed: tuple[str, ...]) -> Check:
    def check(name: str, value: object) -> None:
        if type(value) is not str:
            raise _bad_type(name, value, "str")
        if value not in allowed:
            raise CodecError("bad_value", f"{name}={_show(value)} not one of {allowed}")

    return check


def _bin(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise _bad_type(name, value, "bin")


_STATS_CHECKS: Final[Mapping[str, Check]] = {
    "samples": _uint(_MAX_INT),
    "loss": _float(),
    "accuracy": _float(0.0, 1.0),
    "val_accuracy": _float(0.0, 1.0),
    "train_seconds": _float(0.0),
}


def _stats(name: str, value: object) -> None:
    if type(value) is not dict:
        raise _bad_type(name, value, "map")
    for key, item in value.items():
        check = _STATS_CHECKS.get(key)
        if check is None:
            raise CodecError("unknown_field", f"{name}.{_show(key)}")
        check(f"{name}.{key}", item)


_CHECKS: Final[Mapping[str, Check]] = {
    "device": _text(_DEVICE_RE, "1..64 chars of [A-Za-z0-9_.-]"),
    "round": _uint(_MAX_INT),
    "model": _text(_HEX_RE, "16..64 lowercase hex digits"),
    "layout": _text(_HEX_RE, "16..64 lowercase hex digits"),
    "enc": _choice(ENCODINGS),
    "nbits": _uint(_MAX_INT),
    "crc32": _uint(_MAX_CRC),
    "version": _uint(_MAX_INT),
    "stats": _stats,
    "deadline": _float(0.0),
    "base": _uint(_MAX_INT),
    "mask_crc32": _uint(_MAX_CRC),
    "downlink": _choice(("structure", "delta")),
    "bits": _bin,
}


def validate(fields: Mapping[Any, object], expect_type: str | None = None) -> None:
    """Check a decoded (or about-to-be-encoded) map; cheap checks first, the crc last."""
    if "v" not in fields:
        raise CodecError("missing_field", "v")
    if type(fields["v"]) is not int:
        raise _bad_type("v", fields["v"], "int")
    if fields["v"] != PROTOCOL_VERSION:
        raise CodecError("bad_version", f"v={_show(fields['v'])}, this codec speaks {PROTOCOL_VERSION}")
    if "type" not in fields:
        raise CodecError("missing_field", "type")
    mtype = fields["type"]
    if type(mtype) is not str:
        raise _bad_type("type", mtype, "str")
    if mtype not in _REQUIRED:
        raise CodecError("bad_value", f"type={_show(mtype)} not one of {TYPES}")
    if expect_type is not None and mtype != expect_type:
        raise CodecError("wrong_type", f"expected {expect_type}, got {mtype}")

    keys = set(fields)
    required = _REQUIRED[mtype]
    allowed = required | _OPTIONAL.get(mtype, frozenset())
    if unknown := [k for k in keys if k not in ORDER]:
        raise CodecError("unknown_field", min(_show(k) for k in unknown))
    if forbidden := keys - allowed:
        raise CodecError("forbidden_field", f"{min(forbidden)} in {mtype}")
    if missing := required - keys:
        raise CodecError("missing_field", f"{min(missing)} in {mtype}")

    for name in ORDER[2:]:
        if name in fields:
            _CHECKS[name](name, fields[name])
    if mtype == "hello" and fields["enc"] != "full":
        raise CodecError("bad_value", "hello must use enc 'full'")
    if fields.get("enc") == "q4" and (mtype != "mask" or fields["nbits"] % 4 != 0):  # type: ignore[operator]
        raise CodecError("bad_value", "enc 'q4' is for mask messages, 4 bits per element")
    if fields.get("enc") == "delta" or any(k in fields for k in _DELTA_FIELDS):
        _check_delta(fields, mtype)
    elif "bits" in fields:
        _check_bits(fields["bits"], fields["nbits"], fields["crc32"])


def _check_delta(fields: Mapping[Any, Any], mtype: str) -> None:
    """enc "delta" (update and mask only) comes with base and mask_crc32, and they only with it; its
    payload is smaller than the raw bits would be and its header is well formed (shared/delta_codec.py)."""
    if fields.get("enc") != "delta":
        raise CodecError("forbidden_field", f"{min(k for k in _DELTA_FIELDS if k in fields)} without enc 'delta'")
    if mtype not in ("update", "mask"):
        raise CodecError("bad_value", "enc 'delta' is for update and mask messages")
    if missing := [k for k in _DELTA_FIELDS if k not in fields]:
        raise CodecError("missing_field", f"{missing[0]} with enc 'delta'")
    bits, nbits = fields["bits"], fields["nbits"]
    if len(bits) >= (nbits + 7) // 8:
        raise CodecError("bad_length", f"a delta payload of {len(bits)} bytes is not smaller than the "
                         f"{(nbits + 7) // 8} raw bytes of {nbits} bits")
    actual = zlib.crc32(bits)
    if actual != fields["crc32"]:
        raise CodecError("bad_crc", f"crc32={fields['crc32']} but the bits hash to {actual}")
    check_payload(bits, nbits)


def _check_bits(bits: Any, nbits: Any, crc: Any) -> None:
    """Length, padding and crc of already type-checked bits, nbits and crc32."""
    if len(bits) != (nbits + 7) // 8:
        raise CodecError("bad_length", f"len(bits)={len(bits)} but nbits={nbits} needs {(nbits + 7) // 8}")
    tail = nbits % 8
    if tail and bits[-1] & (0xFF >> tail):
        raise CodecError("bad_padding", f"padding bits after bit {nbits} are not zero")
    actual = zlib.crc32(bits)
    if actual != crc:
        raise CodecError("bad_crc", f"crc32={crc} but the bits hash to {actual}")
