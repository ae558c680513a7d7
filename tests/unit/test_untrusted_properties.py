"""shared/amqp/untrusted.py: total decoding of a board's message properties, and clean dead letters.

The three header poisons of issue 10 (each shown to break pika's own decoder or encoder first), the
frame-level wrapper, the pin that our connections really get SafeSelectConnection, and a fuzz run
(FEDMASK_FUZZ_EXAMPLES examples, 300 by default) through the consumer's own intake: whatever bytes
arrive, no exception escapes, and each delivery is either read or marked for rejection with a reason.
"""

from __future__ import annotations

import inspect
import os
import struct
from types import SimpleNamespace
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.connection
import pika.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.bench import raw_broker as raw
from shared.amqp import AmqpSettings, Consumer, Outcome, connection, untrusted

FUZZ = settings(max_examples=int(os.environ.get("FEDMASK_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
USER = "device-mallory"

POISONS = {
    "timestamp past 9999": raw.field_table([("sent", raw.timestamp_value(raw.MAX_DATETIME_SECONDS + 1))]),
    "nested 1,500 deep": raw.field_table([("n", raw.nested_table_value(1500))]),
}


def props(headers: bytes | None) -> bytes:
    return raw.basic_properties_bytes(headers=headers, user_id=USER)


def header_frame(properties: bytes, body_size: int = 1) -> bytes:
    payload = struct.pack(">HHQ", 60, 0, body_size) + properties
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


@pytest.mark.parametrize("case", sorted(POISONS))
def test_a_header_pika_cannot_decode_becomes_a_problem_not_an_exception(case: str) -> None:
    encoded = props(POISONS[case])
    with pytest.raises((ValueError, OverflowError, RecursionError)):  # pika 1.4.4, as in the issue
        pika.spec.BasicProperties().decode(encoded)
    decoded = untrusted.decode_properties(encoded)
    assert isinstance(decoded, untrusted.UndecodableProperties) and decoded.problem
    assert decoded.headers is None and decoded.user_id == USER  # the table is stepped over by its length


def test_a_double_of_1e300_decodes_and_its_dead_letter_still_encodes() -> None:
    encoded = props(raw.field_table([("d", raw.double_value(1e300))]))
    decoded = untrusted.decode_properties(encoded)
    assert not isinstance(decoded, untrusted.UndecodableProperties)
    assert decoded.headers["d"] == int(1e300)  # pika's decoder makes an int of every float
    with pytest.raises(struct.error):  # ... which no AMQP integer holds: re-publishing it raised
        pika.spec.BasicProperties(headers=decoded.headers).encode()
    dead = untrusted.dead_letter_properties(reason="undecodable", exchange="fedmask.uplink",
                                            routing_key="device.m.update", queue="aggregator.uplink",
                                            rejected_by="fedmask-aggregator", received=decoded,
                                            headers=decoded.headers)
    assert "d" not in dead.headers and dead.headers["x-original-user-id"] == USER
    assert dead.encode()


def test_dead_letter_headers_are_ours_escaped_and_never_copied() -> None:
    forged = {"x-original-user-id": "device-alice", "x-reject-reason": "fine", "x-delivery-count": 3}
    received = pika.BasicProperties(user_id=USER, headers=forged, message_id="m\n1")
    dead = untrusted.dead_letter_properties(reason="bad_crc\n{}", exchange="fedmask.uplink",
                                            routing_key='device.m.x\n{"msg":"forged"}', queue="aggregator.uplink",
                                            rejected_by="agg", received=received, headers=forged)
    h = dead.headers
    assert h["x-original-user-id"] == USER and h["x-original-delivery-count"] == 3
    assert h["x-reject-reason"] == "bad_crc\\x0a{}"
    assert h["x-original-routing-key"] == 'device.m.x\\x0a{\\"msg\\":\\"forged\\"}'
    assert dead.message_id == "m\\x0a1" and dead.user_id is None


def test_decode_frame_wraps_pikas_for_header_frames_only() -> None:
    frame = header_frame(props(POISONS["nested 1,500 deep"]), body_size=7)
    assert untrusted.decode_frame(frame[:-1]) == (0, None)  # incomplete: wait for more
    consumed, header = untrusted.decode_frame(frame + b"more")
    assert consumed == len(frame) and header.body_size == 7
    assert isinstance(header.properties, untrusted.UndecodableProperties)
    heartbeat = pika.frame.Heartbeat().marshal()
    assert isinstance(untrusted.decode_frame(heartbeat)[1], pika.frame.Heartbeat)
    honest = header_frame(props(None))
    assert untrusted.decode_frame(honest)[1].properties.user_id == USER


def test_our_connections_read_frames_with_the_safe_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the pika internals the fix relies on, so an upgrade that changes them fails here."""
    assert "_impl_class" in inspect.signature(pika.BlockingConnection.__init__).parameters
    assert callable(pika.connection.Connection._read_frame)
    assert untrusted.SafeSelectConnection._read_frame is not pika.connection.Connection._read_frame
    seen: dict[str, Any] = {}
    monkeypatch.setattr(connection.pika, "BlockingConnection", lambda params, **kw: seen.update(kw) or "conn")
    assert connection._connect(AmqpSettings(), "test") == "conn"
    assert seen["_impl_class"] is untrusted.SafeSelectConnection


# ------------------------------------------------------------------------------------------ fuzzing

short_keys = st.sampled_from([b"a", b"x-delivery-count", b"x-original-user-id", b"\xff\xfe", b"k\n{", b""])


def _value(kind: str, draw: Any) -> bytes:
    if kind == "T":
        return raw.timestamp_value(draw(st.integers(0, 2**64 - 1)))
    if kind in "fd":
        x = draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == "f" else 64))
        return kind.encode() + struct.pack(">f" if kind == "f" else ">d", x)
    if kind in "Sx":
        data = draw(st.binary(max_size=40))
        return kind.encode() + struct.pack(">I", len(data)) + data
    size = {"t": 1, "b": 1, "B": 1, "U": 2, "u": 2, "s": 2, "I": 4, "i": 4, "l": 8, "L": 8, "D": 5, "V": 0}[kind]
    return kind.encode() + draw(st.binary(min_size=size, max_size=size))


@st.composite
def field_values(draw: Any, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from("tbBUusIilLfdDTSxV" + ("AF" if depth < 12 else "")))
    if kind == "F":
        return b"F" + draw(tables(depth + 1))
    if kind == "A":
        items = b"".join(draw(st.lists(field_values(depth + 1), max_size=3)))
        return b"A" + struct.pack(">I", len(items)) + items
    return _value(kind, draw)


@st.composite
def tables(draw: Any, depth: int = 0) -> bytes:
    entries = draw(st.lists(st.tuples(short_keys, field_values(depth)), max_size=4 if depth < 3 else 1))
    payload = b"".join(struct.pack("B", len(k)) + k + v for k, v in entries)
    return struct.pack(">I", len(payload)) + payload


@st.composite
def property_payloads(draw: Any) -> bytes:
    """Well-formed property bytes around a random header table, then maybe garbled."""
    encoded = props(draw(tables()))
    how = draw(st.sampled_from(["as is", "truncated", "flipped", "random"]))
    if how == "truncated":
        encoded = encoded[:draw(st.integers(0, len(encoded)))]
    elif how == "flipped" and encoded:
        i = draw(st.integers(0, len(encoded) - 1))
        encoded = encoded[:i] + bytes([encoded[i] ^ draw(st.integers(1, 255))]) + encoded[i + 1:]
    elif how == "random":
        encoded = draw(st.binary(max_size=200))
    return encoded


def _intake(encoded: bytes) -> tuple[Any, Any]:
    """One header frame through decode_frame and the consumer's _on_message, as on a live connection."""
    consumer = Consumer(AmqpSettings(), "aggregator.uplink", lambda d: Outcome.ack())
    link = SimpleNamespace(open=True, accepting=True)
    _, frame = untrusted.decode_frame(header_frame(encoded))
    method = SimpleNamespace(routing_key=b"device.m.\xff\n", exchange="fedmask.uplink", redelivered=False,
                             delivery_tag=1)
    consumer._on_message(link, None, method, frame.properties, b"x")  # type: ignore[arg-type]
    return consumer._work.get_nowait(), frame.properties


@FUZZ
@given(property_payloads())
def test_fuzzed_properties_are_read_or_rejected_with_a_reason(encoded: bytes) -> None:
    work, properties = _intake(encoded)
    assert isinstance(work.delivery.routing_key, str)
    if work.problem:  # rejected: bad_properties, and why
        assert isinstance(properties, untrusted.UndecodableProperties) and work.delivery.headers == {}
    else:  # read: plain headers, and nothing in them that is not plain data
        assert isinstance(work.delivery.headers, dict)
        assert all(isinstance(k, str) for k in work.delivery.headers)
    dead = untrusted.dead_letter_properties(reason="bad_properties" if work.problem else "undecodable",
                                            exchange=work.exchange, routing_key=work.delivery.routing_key,
                                            queue="aggregator.uplink", rejected_by="agg", received=properties,
                                            headers=work.delivery.headers)
    assert dead.encode()  # a dead letter always goes out
    assert all(v.isprintable() for v in dead.headers.values() if isinstance(v, str))  # one line, no controls


@FUZZ
@given(st.binary(max_size=300))
def test_fuzzed_bytes_decode_to_properties_or_a_problem(encoded: bytes) -> None:
    decoded = untrusted.decode_properties(encoded)
    assert isinstance(decoded, pika.spec.BasicProperties)
    if isinstance(decoded, untrusted.UndecodableProperties):
        assert decoded.problem
