"""shared.delta_codec and enc "delta" in the message codec: lossless round trips at many flip rates,
the edge cases, the choice of raw when coding does not pay, and hostile payloads rejected with a reason
(a wrong base is caught by the CRC of the decoded mask, never applied)."""

from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.delta_codec import (
    DELTA_FORMAT,
    MAX_SEGMENTS,
    check_payload,
    code_mask,
    decode_change,
    encode_change,
    layer_segments,
)
from shared.errors import CodecError

FUZZ = settings(max_examples=int(os.environ.get("FEDMASK_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
HEAD = {"device": "jetson-07", "round": 12, "model": "0123456789abcdef" * 4, "layout": "fedcba98" * 2}


def masks(nbits: int, flip_rate: float, seed: int = 0, ones: float = 0.5) -> tuple[bytes, bytes]:
    """(new, base) packed: base with `ones` density, new = base with each bit flipped at `flip_rate`."""
    rng = np.random.default_rng(seed)
    base = rng.random(nbits) < ones
    new = base ^ (rng.random(nbits) < flip_rate)
    return np.packbits(new).tobytes(), np.packbits(base).tobytes()


def entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def reason(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecError) as info:
        fn(*args)
    return info.value.reason


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("nbits", [9, 1003, 65_536, 200_003])
@pytest.mark.parametrize("rate", [0.0, 0.001, 0.01, 0.05, 0.2, 0.45, 1.0])
def test_round_trip_at_every_flip_rate(nbits: int, rate: float) -> None:
    new, base = masks(nbits, rate, seed=nbits)
    coded = code_mask(new, nbits, base, 7)
    if coded.enc == "delta":
        assert coded.base == 7 and coded.mask_crc32 == zlib.crc32(new) and len(coded.bits) < len(new)
        assert decode_change(coded.bits, base, nbits, zlib.crc32(new)) == new
    else:
        assert coded.bits == new and coded.base is None
    payload = encode_change(new, base, nbits)  # the coder itself round-trips even where raw wins
    assert decode_change(payload, base, nbits, zlib.crc32(new)) == new


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_size_is_close_to_the_entropy(rate: float) -> None:
    nbits = 200_000
    new, base = masks(nbits, rate)
    bits_per_bit = 8 * len(encode_change(new, base, nbits)) / nbits
    assert entropy(rate) <= bits_per_bit + 0.005 and bits_per_bit <= 1.02 * entropy(rate) + 0.002


def test_no_flips_and_all_flips_cost_a_header() -> None:
    nbits = 100_000
    new, base = masks(nbits, 0.0)
    assert new == base
    assert len(code_mask(new, nbits, base, 1).bits) <= 16
    inverted, _ = masks(nbits, 1.0)
    coded = code_mask(inverted, nbits, base, 1)
    assert coded.enc == "delta" and len(coded.bits) <= 16
    assert decode_change(coded.bits, base, nbits, zlib.crc32(inverted)) == inverted


def test_raw_when_coding_does_not_pay() -> None:
    new, base = masks(4000, 0.5)  # a coin flip per bit: no coding beats the raw bits
    assert code_mask(new, 4000, base, 3).enc == "structure"
    assert code_mask(b"", 0, b"", 3).enc == "structure"  # an empty structure
    assert code_mask(b"\x80", 1, b"\x00", 3).enc == "structure"  # a one-byte mask cannot shrink
    assert code_mask(new, 4000, None, 3).enc == "structure"  # no shared base


def test_segments_follow_the_layers_and_help() -> None:
    # Layer 1: 10,000 bits flipping at 0.5%; layer 2: 2,000 bits at 20%: one probability for both wastes bits.
    rng = np.random.default_rng(5)
    base = rng.random(12_000) < 0.5
    flips = np.concatenate([rng.random(10_000) < 0.005, rng.random(2_000) < 0.2])
    new, old = np.packbits(base ^ flips).tobytes(), np.packbits(base).tobytes()
    where = np.arange(12_000, dtype=np.int32)
    segments = layer_segments(where, [10_000, 2_000])
    assert segments == [1250, 250]
    layered, single = encode_change(new, old, 12_000, segments), encode_change(new, old, 12_000)
    assert len(layered) < 0.85 * len(single)
    assert decode_change(layered, old, 12_000, zlib.crc32(new)) == new


def test_layer_segments_in_structure_coordinates() -> None:
    # A structure keeping every other bit of layer 1 (size 100) and all of layer 2 (size 60).
    where = np.concatenate([np.arange(0, 100, 2), np.arange(100, 160)]).astype(np.int32)
    assert layer_segments(where, [100, 60]) == [6, 8]  # layer 2 starts at structure bit 50: byte 6
    assert layer_segments(where[:50], [100, 60]) == [7]  # a layer with no bits in the structure: no segment
    assert layer_segments(np.zeros(0, np.int32), [100, 60]) == []


# ---------------------------------------------------------------- hostile payloads


def _payload(nbits: int = 8_000, rate: float = 0.02) -> tuple[bytes, bytes, bytes]:
    new, base = masks(nbits, rate, seed=11)
    return encode_change(new, base, nbits, [500, 500]), new, base


def test_a_wrong_base_is_detected_by_the_crc() -> None:
    payload, new, base = _payload()
    other_base, _ = masks(8_000, 0.0, seed=99)
    # Under another base's models the coded data decodes to another mask, or is invalid outright.
    assert reason(decode_change, payload, other_base, 8_000, zlib.crc32(new)) in ("bad_base", "bad_delta")
    assert reason(decode_change, payload, base, 8_000, zlib.crc32(new) ^ 1) == "bad_base"


@pytest.mark.parametrize("tamper", [
    "empty", "format", "no_segments", "too_many_segments", "short_header", "sizes_short", "sizes_long",
    "zero_q", "zero_size", "not_whole_words", "trailing_words", "truncated_words"])
def test_malformed_payloads_are_bad_delta(tamper: str) -> None:
    payload, new, base = _payload()
    seg = struct.Struct(">IHH")
    bad = {
        "empty": b"",
        "format": bytes((DELTA_FORMAT + 1,)) + payload[1:],
        "no_segments": bytes((DELTA_FORMAT, 0)) + payload[2:],
        "too_many_segments": bytes((DELTA_FORMAT, MAX_SEGMENTS + 1)) + seg.pack(1, 1, 1) * (MAX_SEGMENTS + 1),
        "short_header": payload[:9],
        "sizes_short": payload[:2] + seg.pack(400, 100, 100) + payload[10:],
        "sizes_long": payload[:2] + seg.pack(10**9, 100, 100) + payload[10:],
        "zero_q": payload[:2] + seg.pack(500, 0, 100) + payload[10:],
        "zero_size": payload[:2] + seg.pack(0, 100, 100) + seg.pack(1000, 100, 100) + payload[18:],
        "not_whole_words": payload + b"\x00",
        "trailing_words": payload + b"\x12\x34\x56\x78" * 3,
        "truncated_words": payload[:-8],
    }[tamper]
    assert reason(decode_change, bad, base, 8_000, zlib.crc32(new)) in ("bad_delta", "bad_base")
    if tamper not in ("trailing_words", "truncated_words"):  # those two need the base to be seen
        assert reason(check_payload, bad, 8_000) == "bad_delta"


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 5_000))
def test_fuzzed_payloads_raise_only_codec_errors(data: bytes, nbits: int) -> None:
    base = bytes((nbits + 7) // 8)
    try:
        out = decode_change(data, base, nbits, 0)
    except CodecError as err:
        assert err.reason in ("bad_delta", "bad_base")
    else:
        assert len(out) == len(base)  # a CRC collision with 0: still exactly the receiver's size


@FUZZ
@given(st.integers(0, 1999), st.integers(0, 255))
def test_fuzzed_corruptions_never_decode_silently(at: int, xor: int) -> None:
    """A corrupted payload is refused, or decodes to the very mask sent (a flip in the coder's slack
    bits of its last word changes nothing): never to another mask. (On the wire the message's crc32
    over the payload catches it first.)"""
    payload, new, base = _payload()
    at %= len(payload)
    bad = payload[:at] + bytes((payload[at] ^ (xor or 1),)) + payload[at + 1:]
    try:
        out = decode_change(bad, base, 8_000, zlib.crc32(new))
    except CodecError:
        return
    assert out == new


@FUZZ
@given(st.integers(0, 1999), st.integers(0, 255))
def test_fuzzed_corruptions_of_the_words_are_refused_or_harmless(at: int, xor: int) -> None:
    """The same inside the compressed words only, where a wrong mask would come from."""
    payload, new, base = _payload()
    words_at = 2 + 8 * payload[1]
    at = words_at + at % (len(payload) - words_at)
    bad = payload[:at] + bytes((payload[at] ^ (xor or 1),)) + payload[at + 1:]
    try:
        out = decode_change(bad, base, 8_000, zlib.crc32(new))
    except CodecError as err:
        assert err.reason in ("bad_delta", "bad_base")
        return
    assert out == new


def test_decoding_time_is_bounded_by_the_receivers_size() -> None:
    # A claimed segment of 2**32-1 symbols is refused before anything is allocated or decoded.
    huge = bytes((DELTA_FORMAT, 1)) + struct.pack(">IHH", 2**32 - 1, 1, 1)
    start = time.perf_counter()
    assert reason(decode_change, huge, bytes(1000), 8_000, 0) == "bad_delta"
    assert time.perf_counter() - start < 0.1


# ---------------------------------------------------------------- the message codec


def _delta_update(**over: object) -> codec.Message:
    new, base = masks(2_000, 0.02)
    coded = code_mask(new, 2_000, base, 11)
    assert coded.enc == "delta"
    fields = {"bits": coded.bits, "nbits": 2_000, "enc": "delta", "base": coded.base, "mask_crc32": coded.mask_crc32,
              "version": 11, "downlink": "delta", **over}
    return codec.make_update(**HEAD, **fields)  # type: ignore[arg-type]


def test_delta_messages_round_trip() -> None:
    msg = _delta_update()
    data = codec.encode(msg)
    assert codec.decode(data) == msg and codec.message_size(msg) == len(data)
    new, base = masks(2_000, 0.02)
    assert msg.bits is not None and msg.mask_crc32 is not None
    assert decode_change(msg.bits, base, 2_000, msg.mask_crc32) == new
    mask = codec.make_mask(**HEAD, bits=msg.bits, nbits=2_000, version=13, enc="delta", base=12,
                           mask_crc32=msg.mask_crc32)
    assert codec.decode(codec.encode(mask), expect_type="mask") == mask


def test_delta_fields_are_checked() -> None:
    with pytest.raises(CodecError) as info:
        _delta_update(base=None)
    assert info.value.reason == "missing_field"
    with pytest.raises(CodecError) as info:
        codec.make_update(**HEAD, bits=np.ones(16, bool), version=1, base=3)  # type: ignore[arg-type]
    assert info.value.reason == "forbidden_field"
    with pytest.raises(CodecError) as info:
        _delta_update(downlink="xor")
    assert info.value.reason == "bad_value"
    with pytest.raises(CodecError) as info:
        _delta_update(nbits=8 * (len(_delta_update().bits or b"")))  # a payload as long as the raw bits
    assert info.value.reason == "bad_length"
    with pytest.raises(CodecError) as info:
        _delta_update(bits=b"\x07" + (_delta_update().bits or b"")[1:])
    assert info.value.reason == "bad_delta"
    with pytest.raises(CodecError) as info:
        codec.make_task(**HEAD, bits=b"\x01\x00\x00\x00\x00\x00", nbits=400, version=1, deadline=1.0, enc="delta")
    assert info.value.reason in ("bad_value", "missing_field")
