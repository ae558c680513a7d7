"""How fast a queue drains without the aggregator: the baselines `fedmask bench pipeline` compares
the aggregator's ingest rate with.

raw      a plain pika consumer (ops/bench/raw_broker.py): basic_consume, manual ack, the given
         prefetch, no work at all, so the baseline does not include the adapter being measured.
adapter  shared.amqp.BatchConsumer (the aggregator's own consumer: a handler thread taking the
         prefetch window as batches, each batch's acks committed in one AMQP transaction) with a
         handler that acks at once. Its rate bounds the aggregator's from above whatever the handler
         does. The same for shared.amqp.Consumer (one delivery per handler call, the consumer the
         aggregator used before batch ingest and the device workers still use). It is timed to the last handler call;
         up to `prefetch` commits may still follow, so it is measured on a queue long enough
         (`min_messages`) for those to stay within a couple of percent.
"""

from __future__ import annotations

import time
from typing import Any

from ops.bench.figures import rate
from ops.bench.raw_broker import SCRATCH_QUEUE, delete_scratch_queue, fill_scratch_queue, raw_drain
from shared.amqp import AmqpSettings, BatchConsumer, Consumer, Delivery, Outcome


def adapter_drain(admin_url: str, bodies: list[bytes], prefetch: int, timeout: float = 300.0, *,
                  batch: bool = True) -> dict[str, float]:
    """Time BatchConsumer (or Consumer) with a handler that only acks: first delivery -> last handler call."""
    fill_scratch_queue(admin_url, bodies)
    calls: list[float] = []

    def ack_at_once(_d: Delivery) -> Outcome:
        calls.append(time.perf_counter())
        return Outcome.ack()

    def ack_batch(ds: list[Delivery]) -> list[Outcome | BaseException]:
        now = time.perf_counter()
        calls.extend(now for _ in ds)
        return [Outcome.ack() for _ in ds]

    settings = AmqpSettings.from_url(admin_url)
    consumer = (BatchConsumer(settings, SCRATCH_QUEUE, ack_batch, prefetch=prefetch) if batch
                else Consumer(settings, SCRATCH_QUEUE, ack_at_once, prefetch=prefetch))
    consumer.start_in_thread()
    try:
        end = time.monotonic() + timeout
        while len(calls) < len(bodies) and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        consumer.stop()
    if len(calls) < len(bodies):
        raise TimeoutError(f"the adapter drained {len(calls)} of {len(bodies)} messages in {timeout:g} s")
    delete_scratch_queue(admin_url)
    return rate(len(bodies), sum(map(len, bodies)), calls[-1] - calls[0])


def adapter_floor(admin_url: str, bodies: list[bytes], prefetch: int, min_messages: int = 1000) -> dict[str, Any]:
    """raw and adapter rates on the same long queue (`bodies` repeated up to `min_messages`)."""
    long = bodies * max(1, -(-min_messages // len(bodies)))
    raw = raw_drain(admin_url, long, prefetch)
    adapter = adapter_drain(admin_url, long, prefetch)
    single = adapter_drain(admin_url, long, prefetch, batch=False)
    return {"raw": raw, "adapter_noop": adapter, "adapter_over_raw": adapter["updates_per_s"] / raw["updates_per_s"],
            "single_noop": single, "single_over_raw": single["updates_per_s"] / raw["updates_per_s"]}
