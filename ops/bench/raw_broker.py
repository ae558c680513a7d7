"""The broker without the project's adapter: plain pika, on purpose.

shared.amqp is otherwise pika's only user. What is here must not go through it: the benchmarks'
raw baseline (how fast the broker alone delivers a queue, against which the aggregator's ingest is
measured), their broker-side bookkeeping (purging device queues, reading dead letters), and, for
the hostile-input tests, publishes that shared.amqp.Publisher never makes (no user_id property;
a flood without publisher confirms, tests/faults/test_flood.py; header tables pika cannot encode,
sent over a socket of our own: RawPublisher).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]
import pika.frame  # type: ignore[import-untyped, unused-ignore]
import pika.spec  # type: ignore[import-untyped, unused-ignore]

from ops.bench.figures import rate
from shared.amqp import CONTENT_TYPE, DEAD_QUEUE, REASON_HEADER, AmqpError, AmqpSettings, device_queue, open_channel

SCRATCH_QUEUE: Final = "bench.scratch"


def fill_scratch_queue(admin_url: str, bodies: list[bytes]) -> None:
    """A fresh quorum queue (the aggregator's queue type) holding `bodies`, persistent and confirmed."""
    with pika.BlockingConnection(pika.URLParameters(admin_url)) as conn:
        ch = conn.channel()
        ch.queue_delete(SCRATCH_QUEUE)
        ch.queue_declare(SCRATCH_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.confirm_delivery()
        props = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=pika.DeliveryMode.Persistent)
        for body in bodies:
            ch.basic_publish("", SCRATCH_QUEUE, body, props, mandatory=True)


def delete_scratch_queue(admin_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(admin_url)) as conn:
        conn.channel().queue_delete(SCRATCH_QUEUE)


def raw_drain(admin_url: str, bodies: list[bytes], prefetch: int) -> dict[str, float]:
    """Time a plain pika consumer draining `bodies` (basic_consume, manual ack, the given prefetch,
    no work at all): first delivery -> last ack."""
    fill_scratch_queue(admin_url, bodies)
    first: float | None = None
    seen = 0
    with pika.BlockingConnection(pika.URLParameters(admin_url)) as conn:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)

        def on_message(channel: Any, method: Any, _props: Any, _body: bytes) -> None:
            nonlocal first, seen
            if first is None:
                first = time.perf_counter()
            channel.basic_ack(method.delivery_tag)
            seen += 1
            if seen == len(bodies):
                channel.stop_consuming()

        ch.basic_consume(SCRATCH_QUEUE, on_message, auto_ack=False)
        ch.start_consuming()
        last = time.perf_counter()
        ch.queue_delete(SCRATCH_QUEUE)
    assert first is not None
    return rate(len(bodies), sum(map(len, bodies)), last - first)


class BrokerAdmin:
    """A plain pika connection as the admin user: purge device queues, read dead letters, scratch queues."""

    def __init__(self, admin_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(admin_url))
        self.channel: Any = self.connection.channel()

    def purge_device_queues(self, device_ids: Sequence[str]) -> dict[str, int]:
        """Empty every device queue; returns how many messages (tasks, masks) each held."""
        return {d: int(self.channel.queue_purge(device_queue(d)).method.message_count) for d in device_ids}

    def dead_letter_reasons(self) -> dict[str, int]:
        """Take every message off dead.letters; count them by their x-reject-reason header."""
        reasons: dict[str, int] = {}
        while True:
            method, props, _body = self.channel.basic_get(DEAD_QUEUE, auto_ack=True)
            if method is None:
                return reasons
            raw = (props.headers or {}).get(REASON_HEADER, "<no reason>")
            reason = raw.decode() if isinstance(raw, bytes) else str(raw)
            reasons[reason] = reasons.get(reason, 0) + 1

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def publish_without_user_id(settings: AmqpSettings, exchange: str, routing_key: str, body: bytes) -> None:
    """Publish `body` persistent and confirmed, but with no user_id property at all (shared.amqp's
    Publisher always sets one). pika errors come out as AmqpError, as from shared.amqp."""
    with open_channel(settings) as channel:
        channel.confirm_delivery()  # so the publish returns only once the broker has it
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=pika.DeliveryMode.Persistent), mandatory=True)


@dataclass
class FloodTally:
    """What one flooding connection did: messages and bytes handed to the broker, publishes it
    refused (the channel or connection closed under us, e.g. a message over max_message_size or
    a per-user limit) and the reason of the last refusal."""

    messages: int = 0
    bytes: int = 0
    refused: int = 0
    last_refusal: str = ""


def flood(settings: AmqpSettings, exchange: str, routing_key: str, body: bytes, until: float,
          tally: FloodTally) -> None:
    """What a stolen board does: publish `body` as fast as pika can, persistent, with its own
    user_id and no publisher confirms, on one connection, until time.time() >= until. A refusal
    is counted and the connection reopened (after 0.2 s: the board keeps trying)."""
    props = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=pika.DeliveryMode.Persistent,
                                 user_id=settings.username)
    while time.time() < until:
        try:
            with pika.BlockingConnection(pika.URLParameters(settings.url)) as conn:
                channel = conn.channel()
                while time.time() < until:
                    channel.basic_publish(exchange, routing_key, body, props)
                    tally.messages += 1
                    tally.bytes += len(body)
        except (pika.exceptions.AMQPError, OSError) as e:
            tally.refused += 1
            tally.last_refusal = f"{type(e).__name__}: {e}"[:200]
            time.sleep(0.2)


def flood_process(url: str, exchange: str, routing_key: str, body_bytes: int, until: float) -> subprocess.Popen[str]:
    """`flood` in a process of its own (an attacker is not in the aggregator's process, and must not
    take its interpreter lock): zero bytes of `body_bytes`, until the wall-clock time `until`. The
    process prints its FloodTally as JSON on stdout when done; read it with `flood_result`."""
    code = ("import json, sys; from dataclasses import asdict; "
            "from ops.bench.raw_broker import FloodTally, flood; from shared.amqp import AmqpSettings; "
            "t = FloodTally(); a = json.loads(sys.argv[1]); "
            "flood(AmqpSettings.from_url(a[0]), a[1], a[2], bytes(a[3]), a[4], t); print(json.dumps(asdict(t)))")
    args = json.dumps([url, exchange, routing_key, body_bytes, until])
    return subprocess.Popen([sys.executable, "-c", code, args], stdout=subprocess.PIPE, text=True)


def flood_result(proc: subprocess.Popen[str], timeout: float) -> FloodTally:
    out, _ = proc.communicate(timeout=timeout)
    return FloodTally(**json.loads(out.strip().splitlines()[-1]))
# -- hand-built content headers (tests/faults/test_hostile_board.py) --------------------------------
# pika can decode, but not encode, some header tables a board can send (a 'T' timestamp past year
# 9999, tables nested deeper than Python's recursion limit), so the poison tests build the content
# header's property bytes themselves and speak just enough AMQP over a socket to publish them. The
# method frames are pika's own marshalling; only the property payload is ours.

MAX_DATETIME_SECONDS: Final = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can hold


def field_table(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """An AMQP field table from (key, encoded value) pairs: the value bytes start with the type octet."""
    payload = b"".join(struct.pack("B", len(k.encode())) + k.encode() + v for k, v in entries)
    return struct.pack(">I", len(payload)) + payload


def timestamp_value(seconds: int) -> bytes:
    return b"T" + struct.pack(">Q", seconds)


def double_value(value: float) -> bytes:
    return b"d" + struct.pack(">d", value)


def long_string_value(value: bytes) -> bytes:
    return b"S" + struct.pack(">I", len(value)) + value


def nested_table_value(depth: int) -> bytes:
    """A table holding a table ... `depth` levels deep (built inside out, no recursion)."""
    value = b"F" + field_table([])
    for _ in range(depth - 1):
        value = b"F" + field_table([("n", value)])
    return value


def basic_properties_bytes(*, headers: bytes | None, user_id: str | None, content_type: str = CONTENT_TYPE,
                           delivery_mode: int = 2) -> bytes:
    """BasicProperties as on the wire (flag word, then the fields present in spec order), with the
    header table given as raw bytes (field_table), so it may hold anything."""
    flags, parts = 0, []
    flags |= pika.spec.BasicProperties.FLAG_CONTENT_TYPE
    parts.append(struct.pack("B", len(content_type)) + content_type.encode())
    if headers is not None:
        flags |= pika.spec.BasicProperties.FLAG_HEADERS
        parts.append(headers)
    flags |= pika.spec.BasicProperties.FLAG_DELIVERY_MODE
    parts.append(struct.pack("B", delivery_mode))
    if user_id is not None:
        flags |= pika.spec.BasicProperties.FLAG_USER_ID
        parts.append(struct.pack("B", len(user_id.encode())) + user_id.encode())
    return struct.pack(">H", flags) + b"".join(parts)


class RawPublisher:
    """One AMQP connection over a plain socket (amqp:// only) that publishes, with publisher confirms,
    messages whose property bytes are given verbatim. Refusals come out as AmqpError, like shared.amqp's."""

    CHANNEL: Final = 1

    def __init__(self, settings: AmqpSettings, timeout: float = 10.0) -> None:
        u = urlsplit(settings.url)
        if u.scheme != "amqp":
            raise AmqpError("RawPublisher speaks amqp:// only")
        self._sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=timeout)
        self._buffer = b""
        self._tag = 0
        self._sock.sendall(pika.frame.ProtocolHeader().marshal())
        self._expect(pika.spec.Connection.Start, channel=0)
        response = f"\0{settings.username}\0{unquote(u.password or 'guest')}"
        self._send_method(0, pika.spec.Connection.StartOk(client_properties={"connection_name": "fedmask:raw"},
                                                          mechanism="PLAIN", response=response))
        tune = self._expect(pika.spec.Connection.Tune, channel=0)
        self.frame_max = int(tune.frame_max) or 131072
        self._send_method(0, pika.spec.Connection.TuneOk(channel_max=1, frame_max=self.frame_max, heartbeat=0))
        self._send_method(0, pika.spec.Connection.Open(virtual_host=settings.vhost))
        self._expect(pika.spec.Connection.OpenOk, channel=0)
        self._send_method(self.CHANNEL, pika.spec.Channel.Open())
        self._expect(pika.spec.Channel.OpenOk)
        self._send_method(self.CHANNEL, pika.spec.Confirm.Select())
        self._expect(pika.spec.Confirm.SelectOk)

    def publish(self, exchange: str, routing_key: str, properties: bytes, body: bytes) -> None:
        """Publish and wait for the broker's confirm; a channel or connection close is an AmqpError."""
        self._send_method(self.CHANNEL, pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                                mandatory=True))
        header = struct.pack(">HHQ", pika.spec.BasicProperties.INDEX, 0, len(body)) + properties
        frames = [self._frame(pika.spec.FRAME_HEADER, header)]
        step = self.frame_max - 8
        frames += [self._frame(pika.spec.FRAME_BODY, body[i:i + step]) for i in range(0, len(body), step)]
        self._sock.sendall(b"".join(frames))
        self._tag += 1
        returned = False
        while True:
            method = self._next_method()
            if isinstance(method, pika.spec.Basic.Return):
                returned = True
                self._skip_content()
            elif isinstance(method, pika.spec.Basic.Ack):
                if returned:
                    raise AmqpError("message was returned unroutable", code=312)
                return
            elif isinstance(method, pika.spec.Basic.Nack):
                raise AmqpError("broker nacked the message")

    def close(self) -> None:
        try:
            self._send_method(0, pika.spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
            self._expect(pika.spec.Connection.CloseOk, channel=0)
        except (AmqpError, OSError):
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> RawPublisher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- frames

    @staticmethod
    def _frame(frame_type: int, payload: bytes) -> bytes:
        return struct.pack(">BHI", frame_type, RawPublisher.CHANNEL, len(payload)) + payload + b"\xce"

    def _send_method(self, channel: int, method: Any) -> None:
        self._sock.sendall(pika.frame.Method(channel, method).marshal())

    def _read_frame(self) -> Any:
        while True:
            consumed, frame = pika.frame.decode_frame(self._buffer)
            if frame is not None:
                self._buffer = self._buffer[consumed:]
                return frame
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AmqpError("the broker closed the socket", retryable=True)
            self._buffer += chunk

    def _next_method(self) -> Any:
        while True:
            frame = self._read_frame()
            if not isinstance(frame, pika.frame.Method):
                continue  # heartbeats
            method = frame.method
            if isinstance(method, (pika.spec.Channel.Close, pika.spec.Connection.Close)):
                closed = "channel" if isinstance(method, pika.spec.Channel.Close) else "connection"
                raise AmqpError(f"broker closed the {closed}: {method.reply_code} {method.reply_text}",
                                code=int(method.reply_code))
            return method

    def _expect(self, kind: Any, channel: int = CHANNEL) -> Any:
        method = self._next_method()
        if not isinstance(method, kind):
            raise AmqpError(f"expected {kind.NAME}, got {method.NAME}")
        return method

    def _skip_content(self) -> None:
        header = self._read_frame()
        remaining = int(getattr(header, "body_size", 0))
        while remaining > 0:
            body = self._read_frame()
            remaining -= len(getattr(body, "fragment", b""))
