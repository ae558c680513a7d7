"""shared.codec: round trips, exact sizes, one crafted input per rejection reason, and fuzzing.

The fuzz tests run FEDMASK_FUZZ_EXAMPLES examples each (300 by default; `make fuzz` asks for 10,000).
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.codec import Message, Stats
from shared.errors import CodecError

FUZZ_EXAMPLES = int(os.environ.get("FEDMASK_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODEL = "0123456789abcdef" * 4
LAYOUT = "fedcba98" * 2
HEAD: dict[str, Any] = {"device": "jetson-07", "round": 12, "model": MODEL, "layout": LAYOUT}
BITS = np.random.default_rng(0).random(1003) < 0.5  # 1003 bits: 5 padding bits in the last byte


def sample_messages() -> dict[str, Message]:
    stats = Stats(samples=640, loss=0.4321, accuracy=0.875, train_seconds=12.5)
    return {
        "hello": codec.make_hello(**HEAD, structure=BITS),
        "update": codec.make_update(**HEAD, bits=BITS, version=11, stats=stats),
        "update_no_stats": codec.make_update(**HEAD, bits=BITS, version=11),
        "update_val_stats": codec.make_update(**HEAD, bits=BITS, version=11,
                                              stats=Stats(samples=640, loss=0.5, accuracy=0.8, val_accuracy=0.75)),
        "update_empty_stats": codec.make_update(**HEAD, bits=BITS, version=11, stats=Stats()),
        "task": codec.make_task(**HEAD, bits=BITS, version=11, deadline=1_700_000_000.5),
        "mask": codec.make_mask(**HEAD, bits=BITS, version=12, enc="full"),
    }


SAMPLES = sample_messages()
WIRE = {name: msgpack.unpackb(codec.encode(msg)) for name, msg in SAMPLES.items()}


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(CodecError) as info:
        codec.decode(data, **kwargs)
    assert info.value.reason in codec.REASONS
    return info.value.reason


def wire(name: str = "update") -> dict[str, Any]:
    """A valid message as the raw map a sender would pack, ready to be tampered with."""
    return dict(WIRE[name])


def with_bits(raw: dict[str, Any], bits: bytes) -> dict[str, Any]:
    """Replace bits and fix the crc, so the only fault left is the one under test."""
    return {**raw, "bits": bits, "crc32": zlib.crc32(bits)}


# ---------------------------------------------------------------- round trips and sizes


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_and_exact_size(name: str) -> None:
    msg = SAMPLES[name]
    data = codec.encode(msg)
    assert codec.decode(data) == msg
    assert codec.decode(data, expect_type=msg.type) == msg
    assert codec.message_size(msg) == len(data)


def test_bits_survive_the_trip() -> None:
    msg = codec.decode(codec.encode(SAMPLES["update"]))
    assert msg.nbits == BITS.size
    assert np.array_equal(msg.unpack(), BITS)
    with pytest.raises(CodecError):
        Message(type="mask", **HEAD).unpack()


@pytest.mark.parametrize("nbytes", [0, 1, 255, 256, 65535, 65536, 70000])
def test_size_is_exact_across_bin_header_widths(nbytes: int) -> None:
    msg = codec.make_mask(**HEAD, bits=bytes(nbytes), nbits=8 * nbytes, version=0)
    assert codec.message_size(msg) == len(codec.encode(msg))
    assert codec.decode(codec.encode(msg)) == msg


def test_helpers_accept_packed_bytes_and_int_for_float() -> None:
    packed, nbits = codec.pack_bits(BITS)
    assert codec.make_update(**HEAD, bits=packed, nbits=nbits, version=1) == codec.make_update(
        **HEAD, bits=BITS, version=1
    )
    task = codec.decode(codec.encode(codec.make_task(**HEAD, bits=BITS, version=1, deadline=1_700_000_000)))
    assert task.deadline == 1_700_000_000.0 and type(task.deadline) is float
    stats = Stats(samples=3, loss=1, accuracy=1, train_seconds=0)
    update = codec.decode(codec.encode(codec.make_update(**HEAD, bits=BITS, version=1, stats=stats)))
    assert update.stats == Stats(samples=3, loss=1.0, accuracy=1.0, train_seconds=0.0)
    n: Any = np  # NumPy scalars are not int/float to mypy, but encode accepts them
    numpy_stats = Stats(samples=n.int64(3), loss=n.float32(1), accuracy=n.float64(1), train_seconds=0)
    from_numpy = codec.make_update(
        **{**HEAD, "round": n.int64(12)}, bits=BITS, version=n.uint32(1), stats=numpy_stats
    )
    assert codec.decode(codec.encode(from_numpy)) == update


def test_pack_bits_round_trip_and_zero_padding() -> None:
    packed, nbits = codec.pack_bits([1, 0, 1])
    assert (packed, nbits) == (b"\xa0", 3)
    assert codec.unpack_bits(packed, nbits).tolist() == [True, False, True]
    with pytest.raises(CodecError):
        codec.pack_bits([0, 2])
    with pytest.raises(CodecError):
        codec.pack_bits(np.zeros((2, 2), dtype=bool))


def test_full_mask_of_500m_params_fits_the_default_limit() -> None:
    msg = codec.make_hello(**HEAD, structure=bytes(62_500_000), nbits=500_000_000)
    data = codec.encode(msg)
    assert len(data) <= codec.MAX_MESSAGE_BYTES
    assert codec.decode(data).nbits == 500_000_000


def test_update_header_overhead_does_not_grow_with_the_mask() -> None:
    small = codec.make_update(**HEAD, bits=bytes(300), nbits=2400, version=11)
    large = codec.make_update(**HEAD, bits=bytes(300_000), nbits=2_400_000, version=11)
    # Only the widths of the bin header and of nbits grow (2 bytes each, bin16/uint16 -> bin32/uint32).
    assert codec.message_size(large) - 300_000 - (codec.message_size(small) - 300) <= 4
    assert codec.message_size(large) - 300_000 < 256


# ---------------------------------------------------------------- one crafted input per reason


def test_too_large() -> None:
    data = codec.encode(SAMPLES["update"])
    assert reason_of(data, max_bytes=len(data) - 1) == "too_large"
    assert codec.decode(data, max_bytes=len(data)) == SAMPLES["update"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\x01",  # array of 2 with one element
        b"\xa5abc",  # str of 5 with 3 bytes
        b"\x81\xa1v\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\x01\x02",  # int map key (strict_map_key)
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        msgpack.packb({"v": 1}) + b"\x00",  # trailing byte
    ],
)
def test_undecodable(data: bytes) -> None:
    assert reason_of(data) == "undecodable"


def test_every_truncation_is_undecodable() -> None:
    data = codec.encode(SAMPLES["task"])
    for end in range(len(data)):
        assert reason_of(data[:end]) == "undecodable"


def test_non_bytes_input() -> None:
    with pytest.raises(CodecError) as info:
        codec.decode("not bytes")  # type: ignore[arg-type]
    assert info.value.reason == "undecodable"


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 declaring 4G entries
        b"\xdf\xff\xff\xff\xff",  # map32 declaring 4G pairs
        b"\xdb\xff\xff\xff\xff",  # str32 declaring 4 GB
        b"\xc6\xff\xff\xff\xff",  # bin32 declaring 4 GB
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 declaring 4 GB
        b"\xdc\xff\xff" + b"\xc0" * 65535,  # array16 longer than any message needs
        b"\x91" * 200_000 + b"\xc0",  # arrays nested 200k deep
        b"\x81\xa1k" * 200_000 + b"\xc0",  # maps nested 200k deep
    ],
)
def test_hostile_headers_fail_fast_without_allocating(data: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        assert reason_of(data) == "undecodable"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("obj", [[1, 2], 1, "update", None, b"\x01"])
def test_not_a_map(obj: object) -> None:
    assert reason_of(msgpack.packb(obj)) == "not_a_map"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "bad_version"),
        ({"v": 0}, "bad_version"),
        ({"v": True}, "bad_type"),
        ({"v": "1"}, "bad_type"),
        ({"type": "bogus"}, "bad_value"),
        ({"type": b"update"}, "bad_type"),
        ({"round": True}, "bad_type"),
        ({"nbits": False}, "bad_type"),
        ({"version": True}, "bad_type"),
        ({"round": 1.0}, "bad_type"),
        ({"round": -1}, "bad_value"),
        ({"round": 2**64 - 1}, "bad_value"),
        ({"version": -(2**63)}, "bad_value"),
        ({"crc32": 2**32}, "bad_value"),
        ({"bits": "abc"}, "bad_type"),
        ({"bits": [1, 0, 1]}, "bad_type"),
        ({"device": ""}, "bad_value"),
        ({"device": "a b"}, "bad_value"),
        ({"device": "x" * 65}, "bad_value"),
        ({"device": "dev\n"}, "bad_value"),
        ({"device": 7}, "bad_type"),
        ({"model": MODEL.upper()}, "bad_value"),
        ({"model": "abc"}, "bad_value"),
        ({"layout": "g" * 16}, "bad_value"),
        ({"enc": "zip"}, "bad_value"),
        ({"stats": [1]}, "bad_type"),
        ({"stats": {"samples": True}}, "bad_type"),
        ({"stats": {"samples": -1}}, "bad_value"),
        ({"stats": {"loss": 1}}, "bad_type"),
        ({"stats": {"loss": math.nan}}, "bad_value"),
        ({"stats": {"loss": math.inf}}, "bad_value"),
        ({"stats": {"accuracy": 1.5}}, "bad_value"),
        ({"stats": {"val_accuracy": 1.0001}}, "bad_value"),
        ({"stats": {"val_accuracy": -0.0001}}, "bad_value"),
        ({"stats": {"val_accuracy": math.nan}}, "bad_value"),
        ({"stats": {"val_accuracy": 1}}, "bad_type"),
        ({"stats": {"val_accuracy": "0.9"}}, "bad_type"),
        ({"stats": {"train_seconds": -0.5}}, "bad_value"),
        ({"stats": {"epochs": 3}}, "unknown_field"),
        ({"extra": 1}, "unknown_field"),
        ({b"device": "x"}, "unknown_field"),
        ({"deadline": 1.0}, "forbidden_field"),
        ({"reason": "no"}, "unknown_field"),  # the nack message type and its reason are gone
        ({"type": "nack"}, "bad_value"),
        ({"crc32": 0}, "bad_crc"),
    ],
)
def test_bad_fields(change: dict[Any, Any], reason: str) -> None:
    assert reason_of(msgpack.packb({**wire(), **change})) == reason


@pytest.mark.parametrize("name", ["v", "type", "device", "round", "bits", "nbits", "crc32", "version"])
def test_missing_field(name: str) -> None:
    raw = wire()
    del raw[name]
    assert reason_of(msgpack.packb(raw)) == "missing_field"


@pytest.mark.parametrize(
    ("name", "change", "reason"),
    [
        ("hello", {"enc": "structure"}, "bad_value"),
        ("hello", {"version": 1}, "forbidden_field"),
        ("task", {"deadline": 5}, "bad_type"),
        ("task", {"deadline": -1.0}, "bad_value"),
        ("mask", {"stats": {}}, "forbidden_field"),
    ],
)
def test_per_type_rules(name: str, change: dict[str, Any], reason: str) -> None:
    assert reason_of(msgpack.packb({**wire(name), **change})) == reason


def test_task_requires_deadline() -> None:
    raw = wire("task")
    del raw["deadline"]
    assert reason_of(msgpack.packb(raw)) == "missing_field"


def test_bits_length_padding_and_crc() -> None:
    raw = wire()  # 1003 bits -> 126 bytes, the low 5 bits of the last byte are padding
    bits: bytes = raw["bits"]
    assert reason_of(msgpack.packb(with_bits(raw, bits[:-1]))) == "bad_length"
    assert reason_of(msgpack.packb(with_bits(raw, bits + b"\x00"))) == "bad_length"
    assert reason_of(msgpack.packb(with_bits(raw, bits[:-1] + bytes([bits[-1] | 0x01])))) == "bad_padding"
    flipped = bytes([bits[0] ^ 0x80]) + bits[1:]
    assert reason_of(msgpack.packb({**raw, "bits": flipped})) == "bad_crc"


def test_whole_bytes_and_empty_bits_are_valid() -> None:
    for nbits in (0, 8, 16):
        msg = codec.make_mask(**HEAD, bits=np.ones(nbits, dtype=bool), version=0)
        assert codec.decode(codec.encode(msg)) == msg


def test_expect_type() -> None:
    data = codec.encode(SAMPLES["update"])
    assert reason_of(data, expect_type="mask") == "wrong_type"
    with pytest.raises(ValueError):
        codec.decode(data, expect_type="updates")


def test_encode_refuses_what_decode_would_refuse() -> None:
    good = SAMPLES["update"]
    for bad in [
        Message(**{**vars(good), "device": "no spaces"}),
        Message(**{**vars(good), "round": True}),
        Message(**{**vars(good), "crc32": 0}),
        Message(**{**vars(good), "deadline": 1.0}),
        Message(**{**vars(good), "stats": Stats(accuracy=2.0)}),
    ]:
        with pytest.raises(CodecError):
            codec.encode(bad)
        with pytest.raises(CodecError):
            codec.message_size(bad)
    with pytest.raises(CodecError):
        codec.make_update(**{**HEAD, "device": ""}, bits=BITS, version=0)
    with pytest.raises(CodecError):
        codec.make_mask(**HEAD, bits=b"\x00", version=0)  # packed bits need nbits
    with pytest.raises(CodecError):
        codec.make_mask(**HEAD, bits=BITS, nbits=5, version=0)


# ---------------------------------------------------------------- fuzzing


def decodes_or_codec_error(data: bytes) -> None:
    """The property every fuzz test checks: a valid Message or a CodecError with a known reason."""
    try:
        msg = codec.decode(data)
    except CodecError as exc:
        assert exc.reason in codec.REASONS
        return
    assert isinstance(msg, Message)
    assert codec.decode(codec.encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decodes_or_codec_error(data)


Edit = tuple[str, int, int]
edits = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(1, 255)),
    min_size=1,
    max_size=6,
)


def apply(data: bytes, ops: list[Edit]) -> bytes:
    buf = bytearray(data)
    for op, at, value in ops:
        i = at % (len(buf) + 1)
        if op == "insert":
            buf.insert(i, value)
        elif buf and op == "flip":
            buf[i % len(buf)] ^= value
        elif buf:
            del buf[i % len(buf)]
    return bytes(buf)


ENCODED = [codec.encode(m) for m in SAMPLES.values()]


@FUZZ
@given(st.sampled_from(ENCODED), edits)
def test_fuzz_mutated_messages(data: bytes, ops: list[Edit]) -> None:
    decodes_or_codec_error(apply(data, ops))


msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=140),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
field_names = st.sampled_from([*codec._ORDER, "samples", "loss", "accuracy", "extra"])


@FUZZ
@given(
    st.sampled_from(list(SAMPLES)),
    st.dictionaries(field_names, msgpack_values, max_size=3),
    st.sets(field_names, max_size=2),
)
def test_fuzz_tampered_fields(name: str, replace: dict[str, Any], drop: set[str]) -> None:
    raw = {k: v for k, v in {**wire(name), **replace}.items() if k not in drop}
    decodes_or_codec_error(msgpack.packb(raw))


hex_ids = st.text("0123456789abcdef", min_size=16, max_size=64)
finite = st.floats(allow_nan=False, allow_infinity=False)
makers: dict[str, Callable[..., Message]] = {
    "update": codec.make_update,
    "task": codec.make_task,
    "mask": codec.make_mask,
}


@settings(max_examples=100, deadline=None)
@given(
    st.text("abcXYZ019_.-", min_size=1, max_size=64),
    st.integers(0, 2**63 - 1),
    hex_ids,
    hex_ids,
    st.lists(st.booleans(), max_size=100),
    st.sampled_from(["hello", "update", "task", "mask"]),
    st.sampled_from(["structure", "full"]),
    st.builds(
        Stats,
        samples=st.none() | st.integers(0, 2**63 - 1),
        loss=st.none() | finite,
        accuracy=st.none() | st.floats(0, 1),
        val_accuracy=st.none() | st.floats(0, 1),
        train_seconds=st.none() | st.floats(0, 1e9),
    ),
)
def test_valid_messages_round_trip(
    device: str, rnd: int, model: str, layout: str, bits: list[bool], kind: str, enc: str, stats: Stats
) -> None:
    head: dict[str, Any] = {"device": device, "round": rnd, "model": model, "layout": layout}
    bit_array = np.array(bits, dtype=bool)
    if kind == "hello":
        msg = codec.make_hello(**head, structure=bit_array)
    else:
        extra: dict[str, Any] = {"deadline": 1e9} if kind == "task" else {}
        if kind == "update":
            extra["stats"] = stats
        msg = makers[kind](**head, bits=bit_array, version=rnd, enc=enc, **extra)
    data = codec.encode(msg)
    assert codec.message_size(msg) == len(data)
    assert codec.decode(data, expect_type=kind) == msg
    assert np.array_equal(msg.unpack(), bit_array)
