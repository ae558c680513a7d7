"""The broker without the project's adapter: plain pika, on purpose.

shared.amqp is otherwise pika's only user. What is here must not go through it: the benchmarks'
raw baseline (how fast the broker alone delivers a queue, against which the aggregator's ingest is
measured), their broker-side bookkeeping (purging device queues, reading dead letters), and, for
the hostile-input tests, a publish that shared.amqp.Publisher never makes (no user_id property).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]

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
