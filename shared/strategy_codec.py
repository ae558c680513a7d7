"""Wire messages of the strategies in shared/strategies/: one msgpack map per message, validated
both ways, tensors carried as payload parts (shared/payloads.py). Registered in shared/codec.py.

Fields
  v         int    PROTOCOL_VERSION (shared/codec_checks.py)
  type      str    "stask" (down: a round's task, with the model when the device lacks it)
                   | "supdate" (up: a device's trained update) | "smodel" (down: a model after a round)
                   | "shello" (up: a board announces itself; `model` is its settings' digest,
                   shared/strategy_setup.py, or FedMask's model fingerprint; parts only for a
                   strategy that enrols with a payload: FedMask's structure)
  strategy  str    the strategy's registry name, 1..32 chars of [a-z0-9-]
  device    str    1..64 chars of [A-Za-z0-9_.-]
  round     int    0 .. 2**63-1
  model     str    version of the global state, 16..64 lowercase hex: stask/smodel the version sent
                   (or held), supdate the version the device trained from
  params    map    stask only, optional: up to 16 str -> bool | int | finite float (e.g. readjust, alpha)
  stats     map    supdate only, optional: samples (int >= 0); loss, train_seconds, flops,
                   dense_flops (finite floats >= 0 except loss)
  parts     array  up to 64 payload parts (shared/payloads.py), names unique

Reason codes are the codec's (too_large, undecodable, not_a_map, bad_version, missing_field,
bad_type, bad_value, unknown_field, forbidden_field, wrong_type, bad_length, bad_padding, bad_crc).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from shared.codec_checks import PROTOCOL_VERSION
from shared.errors import CodecError
from shared.payloads import Part, part_from_wire, part_to_wire

STRATEGY_TYPES: Final = ("stask", "supdate", "smodel", "shello")
MAX_PARTS: Final = 64
MAX_BYTES: Final = 64 * 1024 * 1024
_STRATEGY_RE = re.compile(r"[a-z0-9-]{1,32}")
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]{16,64}")
_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
_FIELDS: Final = ("v", "type", "strategy", "device", "round", "model", "params", "stats", "parts")
_STATS_FLOATS: Final = ("loss", "train_seconds", "flops", "dense_flops")
Param = bool | int | float


@dataclass(frozen=True, kw_only=True)
class StrategyMessage:
    type: str
    strategy: str
    device: str
    round: int
    model: str
    parts: tuple[Part, ...] = ()
    params: Mapping[str, Param] = field(default_factory=dict)
    stats: Mapping[str, int | float] = field(default_factory=dict)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise CodecError("missing_field", f"part {name} in {self.type}")

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.parts)


def encode_strategy(msg: StrategyMessage) -> bytes:
    wire = _to_wire(msg)
    _validate(wire, None)  # what decode would check, so nothing emitted is refused
    packed: bytes = msgpack.packb(wire)
    return packed


def decode_strategy(data: bytes, *, max_bytes: int = MAX_BYTES, expect_type: str | None = None) -> StrategyMessage:
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError("undecodable", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, max_bin_len=max_bytes,
                              max_str_len=1024, max_array_len=MAX_PARTS, max_map_len=32, max_ext_len=0)
    except Exception as exc:  # every msgpack failure means the same here
        raise CodecError("undecodable", f"{type(exc).__name__}: {str(exc)[:80]}") from exc
    if type(obj) is not dict:
        raise CodecError("not_a_map", f"top level is {type(obj).__name__}")
    return _validate(obj, expect_type)


def _to_wire(msg: StrategyMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.type, "strategy": msg.strategy, "device": msg.device,
                           "round": int(msg.round), "model": msg.model}
    if msg.params:
        out["params"] = {k: _scalar(v) for k, v in msg.params.items()}
    if msg.stats:
        out["stats"] = {k: (int(v) if k == "samples" else float(v)) for k, v in msg.stats.items()}
    out["parts"] = [part_to_wire(p) for p in msg.parts]
    return out


def _scalar(v: object) -> object:
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    return float(v)  # type: ignore[arg-type]


def _validate(obj: Mapping[Any, Any], expect_type: str | None) -> StrategyMessage:
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise CodecError("bad_version" if "v" in obj else "missing_field", "v")
    if unknown := [k for k in obj if k not in _FIELDS]:
        raise CodecError("unknown_field", str(unknown[0])[:32])
    for key in ("type", "strategy", "device", "round", "model", "parts"):
        if key not in obj:
            raise CodecError("missing_field", key)
    mtype = _typed(obj, "type", str)
    if mtype not in STRATEGY_TYPES:
        raise CodecError("bad_value", f"type {mtype[:16]!r} not one of {STRATEGY_TYPES}")
    if expect_type is not None and mtype != expect_type:
        raise CodecError("wrong_type", f"expected {expect_type}, got {mtype}")
    for key, pattern in (("strategy", _STRATEGY_RE), ("device", _DEVICE_RE), ("model", _HEX_RE)):
        if not pattern.fullmatch(_typed(obj, key, str)):
            raise CodecError("bad_value", f"{key}={obj[key][:32]!r}")
    rnd = _typed(obj, "round", int)
    if not 0 <= rnd < 2**63:
        raise CodecError("bad_value", f"round={rnd}")
    if "params" in obj and mtype != "stask":
        raise CodecError("forbidden_field", f"params in {mtype}")
    if "stats" in obj and mtype != "supdate":
        raise CodecError("forbidden_field", f"stats in {mtype}")
    params = _params(obj.get("params", {}))
    stats = _stats(obj.get("stats", {}))
    raw_parts = obj["parts"]
    if type(raw_parts) not in (list, tuple):
        raise CodecError("bad_type", "parts: expected array")
    parts = tuple(part_from_wire(p) for p in raw_parts)
    if len({p.name for p in parts}) != len(parts):
        raise CodecError("bad_value", "part names repeat")
    return StrategyMessage(type=mtype, strategy=obj["strategy"], device=obj["device"], round=rnd, model=obj["model"],
                           parts=parts, params=params, stats=stats)


def _params(raw: object) -> dict[str, Param]:
    if type(raw) is not dict:
        raise CodecError("bad_type", "params: expected map")
    if len(raw) > 16:
        raise CodecError("bad_value", f"params: {len(raw)} entries > 16")
    for k, v in raw.items():
        if type(k) is not str or not _KEY_RE.fullmatch(k):
            raise CodecError("bad_value", f"params key {str(k)[:32]!r}")
        if type(v) not in (bool, int, float) or (type(v) is float and not math.isfinite(v)):
            raise CodecError("bad_type" if type(v) not in (bool, int, float) else "bad_value", f"params.{k}")
    return dict(raw)


def _stats(raw: object) -> dict[str, int | float]:
    if type(raw) is not dict:
        raise CodecError("bad_type", "stats: expected map")
    for k, v in raw.items():
        if k == "samples":
            if type(v) is not int or v < 0:
                raise CodecError("bad_value" if type(v) is int else "bad_type", "stats.samples")
        elif k in _STATS_FLOATS:
            if type(v) is not float:
                raise CodecError("bad_type", f"stats.{k}: expected float")
            if not math.isfinite(v) or (k != "loss" and v < 0):
                raise CodecError("bad_value", f"stats.{k}={v!r}")
        else:
            raise CodecError("unknown_field", f"stats.{str(k)[:32]}")
    return dict(raw)


def _typed(obj: Mapping[Any, Any], key: str, kind: type) -> Any:
    value = obj[key]
    if type(value) is not kind:
        raise CodecError("bad_type", f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value
