"""What a board puts in a message's properties, read without trusting it: a total decoder for the
content header, and the clean properties a dead letter goes out with.

Why the frame parser itself. pika decodes the content header inside its frame parser, on the
connection's I/O loop, before any consumer callback runs (Connection._read_frame ->
frame.decode_frame -> BasicProperties.decode -> data.decode_table). A header table it cannot
represent raises there: a 'T' timestamp past year 9999 (ValueError or OverflowError from
datetime.fromtimestamp; pika issue #1698, unguarded in the pika 1.4.4 we run), a float or double that
is NaN or infinite (data.decode_value calls int() on it), tables nested past Python's recursion limit
(RecursionError), a table longer than its frame (struct.error). The transport reports that as a lost
stream and drops the connection; the unacked message goes back to the head of the quorum queue and
the consumer meets it again on every reconnect: a wedge that no callback of ours ever sees. So the
parser has to be total: `decode_frame` reads header frames with `decode_properties`, which never
raises and turns what it cannot read into `UndecodableProperties` (every field None, `problem` set);
the consumer then dead-letters that delivery with reason bad_properties, like any other rejection.

Why a subclass and not a patch. `SafeSelectConnection` overrides the one frame-reading method and
BlockingConnection takes it through its `_impl_class` argument (connection._connect passes it), so
only shared.amqp's own connections use it: pika stays unpatched for everybody else in the process
(ops/bench/raw_broker.py, the tests' own pika use, other libraries). `_impl_class` is marked "for
tests/debugging" in pika; tests/unit/test_untrusted_properties.py checks our connections still get
the class, so a pika upgrade that drops the argument fails a test rather than silently reopening
the hole.

Dead letters never carry a received header: a value pika decoded may not encode again (a double of
1e300 decodes to a 301-digit int that no AMQP integer type holds, so re-publishing it raised in the
I/O loop, another wedge), and a header a board wrote (a forged x-original-user-id) must not read
as ours. `dead_letter_properties` builds the header set from scratch: our reason, the original
routing key and exchange escaped and truncated, the broker-validated user_id under our own name,
the broker's delivery count if it is an integer.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]
import pika.frame  # type: ignore[import-untyped, unused-ignore]
import pika.spec  # type: ignore[import-untyped, unused-ignore]
from pika.adapters.select_connection import SelectConnection  # type: ignore[import-untyped, unused-ignore]

from shared.log_safety import printable

REASON_HEADER: Final = "x-reject-reason"
PROBLEM_HEADER: Final = "x-properties-problem"  # what could not be read, for bad_properties
MAX_REASON_CHARS: Final = 256
MAX_TABLE_DEPTH: Final = 8  # tables/arrays inside the header table; RabbitMQ's own x-death needs 3
MAX_HEADER_FIELDS: Final = 256  # fields in the whole header table, nested ones included
MAX_TIMESTAMP: Final = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime holds
_FIXED_SIZES: Final = {b"t": 1, b"b": 1, b"B": 1, b"U": 2, b"u": 2, b"s": 2, b"I": 4, b"i": 4, b"f": 4,
                       b"L": 8, b"l": 8, b"d": 8, b"T": 8, b"D": 5, b"V": 0}
_FLAG_CONTENT_TYPE: Final = 1 << 15
_FLAG_CONTENT_ENCODING: Final = 1 << 14
_FLAG_HEADERS: Final = 1 << 13


class UndecodableProperties(pika.spec.BasicProperties):  # type: ignore[misc]
    """Properties that could not be read: `problem` says why; no headers. `user_id` is still set when
    the header table could be stepped over by its length (the broker validated it: it names the sender)."""

    def __init__(self, problem: str, user_id: str | None = None) -> None:
        super().__init__(user_id=user_id)
        self.problem = problem


def _table_problem(data: bytes, offset: int) -> str | None:
    """Why the header table at `offset` is not one pika can decode and we want to read, or None.
    Iterative (a stack of open containers), so depth costs no recursion here."""
    (size,) = struct.unpack_from(">I", data, offset)
    offset += 4
    stack = [(offset + size, True)]  # (end offset, is a table: its fields have names)
    if stack[0][0] > len(data):
        return "header table longer than its frame"
    fields = 0
    while stack:
        end, is_table = stack[-1]
        if offset == end:
            stack.pop()
            continue
        if offset > end:
            return "a header field runs past the end of its table"
        if is_table:
            offset += 1 + data[offset]  # the field name, a short string
        kind = data[offset:offset + 1]
        offset += 1
        fields += 1
        if fields > MAX_HEADER_FIELDS:
            return f"more than {MAX_HEADER_FIELDS} header fields"
        if kind in _FIXED_SIZES:
            if kind == b"T" and struct.unpack_from(">Q", data, offset)[0] > MAX_TIMESTAMP:
                return "a timestamp header past 9999-12-31"
            if kind in (b"f", b"d") and not math.isfinite(struct.unpack_from(">f" if kind == b"f" else ">d",
                                                                              data, offset)[0]):
                return "a float header that is NaN or infinite"
            offset += _FIXED_SIZES[kind]
        elif kind in (b"S", b"x", b"A", b"F"):
            (length,) = struct.unpack_from(">I", data, offset)
            offset += 4
            if kind in (b"S", b"x"):
                offset += length
            else:
                if offset + length > end:
                    return "a nested header table longer than its parent"
                stack.append((offset + length, kind == b"F"))
                if len(stack) > MAX_TABLE_DEPTH:
                    return f"header tables nested deeper than {MAX_TABLE_DEPTH}"
        else:
            return f"unknown header field type {printable(kind, 4)}"
        if offset > len(data):
            return "header table longer than its frame"
    return None


def _user_id_past_the_table(encoded: bytes) -> str | None:
    """The user_id of properties whose header table we refuse: the same payload with the table
    replaced by an empty one (skipped by its declared length), decoded by pika; None if that fails."""
    try:
        (flags,) = struct.unpack_from(">H", encoded, 0)
        offset = 2
        for flag in (_FLAG_CONTENT_TYPE, _FLAG_CONTENT_ENCODING):
            if flags & flag:
                offset += 1 + encoded[offset]
        if flags & 1 or not flags & _FLAG_HEADERS:
            return None
        (size,) = struct.unpack_from(">I", encoded, offset)
        rest = encoded[offset + 4 + size:]
        if offset + 4 + size > len(encoded):
            return None
        user_id = pika.spec.BasicProperties().decode(encoded[:offset] + b"\0\0\0\0" + rest).user_id
        return user_id if isinstance(user_id, str) else None
    except Exception:  # anything: it was a courtesy
        return None


def properties_problem(encoded: bytes) -> str | None:
    """Why the BasicProperties payload `encoded` (flag words, then the fields) is not to be decoded, or
    None. Checks the flag words and the header table; the other fields are plain strings and octets."""
    try:
        offset, flags, words = 0, 0, 0
        while True:
            (partial,) = struct.unpack_from(">H", encoded, offset)
            offset += 2
            flags |= partial << (16 * words)
            words += 1
            if not partial & 1:
                break
            if words >= 2:  # BasicProperties has 14 flags: one word, a second only by mistake
                return "more property flag words than BasicProperties has"
        for flag in (_FLAG_CONTENT_TYPE, _FLAG_CONTENT_ENCODING):
            if flags & flag:
                offset += 1 + encoded[offset]
        if flags & _FLAG_HEADERS:
            return _table_problem(encoded, offset)
        return None
    except (struct.error, IndexError):
        return "properties shorter than their flags say"


def decode_properties(encoded: bytes) -> Any:
    """BasicProperties from their wire payload; never raises: UndecodableProperties when they cannot
    be read (see the module docstring for why this must be total)."""
    problem = properties_problem(encoded)
    if problem is None:
        try:
            return pika.spec.BasicProperties().decode(encoded)
        except Exception as exc:  # anything pika's decoder raises; RecursionError included
            problem = f"pika could not decode the properties ({type(exc).__name__})"
    return UndecodableProperties(problem, _user_id_past_the_table(encoded))


def decode_frame(data_in: bytes) -> tuple[int, Any]:
    """pika.frame.decode_frame, except that a content header frame's properties go through
    decode_properties. Returns (bytes consumed, frame), (0, None) while the frame is incomplete."""
    if len(data_in) < 7 or data_in[0] != pika.spec.FRAME_HEADER:
        return pika.frame.decode_frame(data_in)  # type: ignore[no-any-return]
    _type, channel, size = struct.unpack_from(">BHL", data_in)
    end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
    if end > len(data_in):
        return 0, None
    if data_in[end - 1] != pika.spec.FRAME_END:
        raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
    payload = bytes(data_in[pika.spec.FRAME_HEADER_SIZE:end - 1])
    if len(payload) < 12:
        return end, pika.frame.Header(channel, 0, UndecodableProperties("content header shorter than 12 bytes"))
    class_id, _weight, body_size = struct.unpack_from(">HHQ", payload)
    if class_id != pika.spec.BasicProperties.INDEX:
        props = UndecodableProperties(f"content header of class {class_id}, not basic")
    else:
        props = decode_properties(payload[12:])
    return end, pika.frame.Header(channel, body_size, props)


class SafeSelectConnection(SelectConnection):  # type: ignore[misc]
    """pika's SelectConnection reading frames with our decode_frame (module docstring: why)."""

    def _read_frame(self) -> tuple[int, Any]:
        return decode_frame(self._frame_buffer)


# -- what a delivery's fields may be used as


def text(value: object, limit: int = 255) -> str:
    """A short-string field (routing key, exchange) as str: pika leaves one that is not UTF-8 as bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")[:limit]
    return value[:limit] if isinstance(value, str) else ""


def plain(value: Any) -> Any:
    """Decoded header values as plain dicts and lists (pika's tables may have bytes keys)."""
    if isinstance(value, Mapping):
        return {text(k) if isinstance(k, (bytes, bytearray)) else str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def delivery_count(headers: Mapping[str, Any]) -> int | None:
    """The broker's x-delivery-count (quorum queues) if it is a sane integer, else None."""
    count = headers.get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**31 else None


def dead_letter_properties(*, reason: str, exchange: str, routing_key: str, queue: str, rejected_by: str,
                           received: Any, headers: Mapping[str, Any]) -> Any:
    """The properties a rejected delivery is re-published to fedmask.dead with: a header set built
    here from checked values only (module docstring). `received` is the delivery's properties (maybe
    UndecodableProperties), `headers` its decoded headers ({} when undecodable)."""
    clean: dict[str, Any] = {
        REASON_HEADER: printable(reason, MAX_REASON_CHARS),
        "x-original-exchange": printable(exchange, 255),
        "x-original-routing-key": printable(routing_key, 255),
        "x-original-queue": queue,
        "x-rejected-by": rejected_by,
        "x-rejected-at": int(time.time()),
    }
    user_id = getattr(received, "user_id", None)
    if isinstance(user_id, str) and user_id:  # validated by the broker: it is the publisher's login
        clean["x-original-user-id"] = printable(user_id, 255)
    count = delivery_count(headers)
    if count is not None:
        clean["x-original-delivery-count"] = count
    if isinstance(received, UndecodableProperties):
        clean[PROBLEM_HEADER] = printable(received.problem, 255)
    message_id = getattr(received, "message_id", None)
    # user_id is left out: the property must equal the publishing connection's user, which is now ours.
    return pika.BasicProperties(
        content_type=_short(getattr(received, "content_type", None)), message_id=_short(message_id),
        timestamp=_timestamp(getattr(received, "timestamp", None)),
        delivery_mode=pika.DeliveryMode.Persistent, headers=clean,
    )


def _short(value: object) -> str | None:
    return printable(value, 128) if isinstance(value, str) else None


def _timestamp(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None
