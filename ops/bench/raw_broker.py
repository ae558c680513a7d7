"""The broker without the project's adapter: plain pika, on purpose.

shared.amqp is otherwise pika's only user. What is here must not go through it: the benchmarks'
raw baseline (how fast the broker alone delivers a queue, against which the aggregator's ingest is
measured), their broker-side bookkeeping (purging device queues, reading dead letters), and, for
the hostile-input tests, publishes that shared.amqp.Publisher never makes (no user_id property;
a flood without publisher confirms, tests/faults/test_flood.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from ops.bench.figures import rate
from shared.amqp import CONTENT_TYPE, DEAD_QUEUE, REASON_HEADER, AmqpSettings, device_queue, open_channel

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
