"""How fast a queue drains without the aggregator: the baselines `fedmask bench pipeline` compares
the aggregator's ingest rate with.

raw      a plain pika consumer: basic_consume, manual ack, the given prefetch, no work at all. pika
         is used directly, on purpose: the baseline must not include the adapter being measured.
adapter  shared.amqp.Consumer (the aggregator's own consumer: a handler thread, and every ack
         committed in an AMQP transaction) with a handler that acks at once. Its rate bounds the
         aggregator's from above whatever the handler does. It is timed to the last handler call;
         up to `prefetch` commits may still follow, so it is measured on a queue long enough
         (`min_messages`) for those to stay within a couple of percent.
"""

from __future__ import annotations

import time
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]

from shared.amqp import CONTENT_TYPE, AmqpSettings, Consumer, Delivery, Outcome

SCRATCH_QUEUE: Final = "bench.scratch"
MB: Final = 1e6


def rate(count: int, nbytes: int, seconds: float) -> dict[str, float]:
    return {"updates": count, "bytes": nbytes, "seconds": seconds, "updates_per_s": count / seconds,
            "mb_per_s": nbytes / MB / seconds}


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


def raw_drain(admin_url: str, bodies: list[bytes], prefetch: int) -> dict[str, float]:
    """Time a plain pika consumer draining `bodies`: first delivery -> last ack."""
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


def adapter_drain(admin_url: str, bodies: list[bytes], prefetch: int, timeout: float = 300.0) -> dict[str, float]:
    """Time shared.amqp.Consumer with a handler that only acks: first delivery -> last handler call."""
    fill_scratch_queue(admin_url, bodies)
    calls: list[float] = []

    def ack_at_once(_d: Delivery) -> Outcome:
        calls.append(time.perf_counter())
        return Outcome.ack()

    consumer = Consumer(AmqpSettings.from_url(admin_url), SCRATCH_QUEUE, ack_at_once, prefetch=prefetch)
    consumer.start_in_thread()
    try:
        end = time.monotonic() + timeout
        while len(calls) < len(bodies) and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        consumer.stop()
    if len(calls) < len(bodies):
        raise TimeoutError(f"the adapter drained {len(calls)} of {len(bodies)} messages in {timeout:g} s")
    with pika.BlockingConnection(pika.URLParameters(admin_url)) as conn:
        conn.channel().queue_delete(SCRATCH_QUEUE)
    return rate(len(bodies), sum(map(len, bodies)), calls[-1] - calls[0])


def adapter_floor(admin_url: str, bodies: list[bytes], prefetch: int, min_messages: int = 1000) -> dict[str, Any]:
    """raw and adapter rates on the same long queue (`bodies` repeated up to `min_messages`)."""
    long = bodies * max(1, -(-min_messages // len(bodies)))
    raw = raw_drain(admin_url, long, prefetch)
    adapter = adapter_drain(admin_url, long, prefetch)
    return {"raw": raw, "adapter_noop": adapter, "adapter_over_raw": adapter["updates_per_s"] / raw["updates_per_s"]}
