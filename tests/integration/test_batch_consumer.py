"""shared/amqp/batch_consumer.py against a real RabbitMQ: a prefetch window reaches the handler as
batches; each delivery is settled by its own result, and one the handler failed on is retried and
dead-lettered alone, its neighbours acked or rejected once."""

from __future__ import annotations

import threading
import time
from collections import Counter

from shared.amqp import (
    AGGREGATOR_QUEUE,
    DEAD_QUEUE,
    REASON_HEADER,
    AmqpSettings,
    BatchConsumer,
    Delivery,
    Outcome,
    Publisher,
    queue_depth,
)
from tests.integration.test_amqp import drain, q, settings, wait_until

__all__ = ["settings"]  # the fixture, imported for pytest


def test_each_delivery_of_a_batch_is_settled_by_its_own_result(settings: AmqpSettings) -> None:
    bodies = [b"ok-%d" % i for i in range(12)] + [b"poison", b"bug"]
    with Publisher(settings) as pub:
        for body in bodies:
            pub.publish_uplink("dev-1", "update", body)
    sizes: list[int] = []
    seen: Counter[bytes] = Counter()
    lock = threading.Lock()

    def handle(ds: list[Delivery]) -> list[Outcome | BaseException]:
        with lock:
            sizes.append(len(ds))
            seen.update(d.body for d in ds)
        return [Outcome.reject("bad_crc") if d.body == b"poison" else
                ValueError("a bug this body triggers") if d.body == b"bug" else Outcome.ack() for d in ds]

    c = BatchConsumer(settings, q(settings, AGGREGATOR_QUEUE), handle, prefetch=16, max_attempts=3,
                      requeue_delay=0.05, linger=0.05)
    c.start_in_thread()
    try:
        assert c.wait_ready(10)
        assert wait_until(lambda: queue_depth(settings, q(settings, DEAD_QUEUE)) == 2, timeout=20)
        time.sleep(0.3)  # the last commit lands
    finally:
        c.stop()
    assert max(sizes) > 1, f"never more than one delivery per batch: {sizes}"
    assert max(sizes) <= c.batch_max == 8
    # Every good body once, the reject once, the failing one its 3 attempts: its batch-mates were not redelivered.
    assert seen == Counter({**{b: 1 for b in bodies[:-1]}, b"bug": 3})
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    dead = {d.body: d.headers[REASON_HEADER] for d in drain(settings, q(settings, DEAD_QUEUE), 2)}
    assert dead == {b"poison": "bad_crc", b"bug": "handler_error"}


def test_a_handler_that_raises_fails_its_batch_and_nothing_is_acked(settings: AmqpSettings) -> None:
    with Publisher(settings) as pub:
        for i in range(4):
            pub.publish_uplink("dev-1", "update", b"m%d" % i)
    calls: list[int] = []
    lock = threading.Lock()

    def handle(ds: list[Delivery]) -> list[Outcome | BaseException]:
        with lock:
            calls.append(len(ds))
        raise RuntimeError("the whole batch failed")

    c = BatchConsumer(settings, q(settings, AGGREGATOR_QUEUE), handle, prefetch=8, max_attempts=2,
                      requeue_delay=0.05)
    c.start_in_thread()
    try:
        assert c.wait_ready(10)
        assert wait_until(lambda: queue_depth(settings, q(settings, DEAD_QUEUE)) == 4, timeout=20)
    finally:
        c.stop()
    assert sum(calls) == 8  # each of the 4 failed twice (max_attempts), then went to dead.letters
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    assert {d.headers[REASON_HEADER] for d in drain(settings, q(settings, DEAD_QUEUE), 4)} == {"handler_error"}
