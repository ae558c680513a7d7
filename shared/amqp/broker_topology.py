"""The broker topology as data (`Topology` and its specs), and declaring and deleting it over AMQP.

Topology (vhost fedmask; every name below is `settings.namespace + NAME`, and the namespace is empty
outside tests):
  fedmask.uplink    topic exchange   devices publish device.<id>.<kind> with user_id = their own user
  aggregator.uplink quorum queue     bound to device.*.*; dead-letters to fedmask.dead; delivery limit
  fedmask.downlink  direct exchange  routing key <id> -> queue device.<id> (classic, dead-letters too)
  fedmask.dead      fanout exchange  -> dead.letters (bounded; its overflow and expired letters go on to)
  fedmask.dropped   fanout exchange  -> dead.dropped (bounded; the aggregator counts and acks what lands here)

Limits (DEAD_LETTER_LIMITS, DROPPED_LIMITS, DEVICE_QUEUE_MAX_LENGTH): nothing a board can cause stays in
the broker unbounded. dead.letters drops its oldest letter when full (RabbitMQ does not count drop-head
discards), so it dead-letters them to fedmask.dropped, where aggregator/dropped_tally.py counts them by
reason (maxlen, expired) into the round store's counters. Queue arguments cannot change on an existing
queue (406 PRECONDITION_FAILED): declare_topology says so and names the way out (docs/deployment.md).

The same specs are declared over the management HTTP API by ops/control/enrolment.py and written out in
broker_config/definitions.json, so the names live here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.amqp.connection import _amqp_errors, _close_quietly, _connect
from shared.amqp.settings import AmqpError, AmqpSettings, device_queue

UPLINK_EXCHANGE: Final = "fedmask.uplink"
DOWNLINK_EXCHANGE: Final = "fedmask.downlink"
DEAD_EXCHANGE: Final = "fedmask.dead"
AGGREGATOR_QUEUE: Final = "aggregator.uplink"
DEAD_QUEUE: Final = "dead.letters"
DROPPED_EXCHANGE: Final = "fedmask.dropped"
DROPPED_QUEUE: Final = "dead.dropped"
UPLINK_BINDING: Final = "device.*.*"
# The second line against a poison message (the first is the consumer: shared/amqp/untrusted.py). A
# quorum queue counts every delivery that came back unsettled (a dropped connection, a nack with
# requeue); past this many RabbitMQ dead-letters the message to fedmask.dead itself, x-death reason
# "delivery_limit" (3.10: 1 + limit deliveries in all). It has to sit well above the consumer's own
# max_attempts (5), so a handler that keeps failing is rejected with our reason first, and above the
# reconnects and restarts an honest update may live through while in flight (each returns up to
# `prefetch` messages at once): the broker's dead letter keeps the message's own headers and no reason
# of ours, and the device that sent it stays "busy" until max_staleness.
UPLINK_DELIVERY_LIMIT: Final = 20

# dead.letters has no consumer in production: an operator reads it. Its bounds: 100,000 letters or
# 256 MiB (a message larger than the byte bound would push every other letter out, measured, so the
# bound holds 1,024 of the largest messages broker_config/rabbitmq.conf admits), the oldest dropped
# first, none kept longer than 7 days.
DEAD_LETTER_LIMITS: Final = {
    "x-max-length": 100_000,
    "x-max-length-bytes": 256 * 1024 * 1024,
    "x-overflow": "drop-head",
    "x-message-ttl": 7 * 24 * 3600 * 1000,
}
# aggregator.uplink takes every board's messages. Unbounded, one flooding board filled it with 710 MB in
# 20 s (tests/faults/test_flood.py) and every honest update waited behind its backlog. Bounded, a full
# queue refuses publishes (reject-publish: a flood cannot push honest updates out, as drop-head would)
# and honest publishers retry their nacked update (shared.amqp.Publisher). An accepted update then
# waits behind about the bound (a quorum queue overshoots it by the publishes in flight: 1,512 messages
# measured under a flood), so the bound is small: 500 messages (the largest fleet measured, bench load
# with 500 boards, sends that many at once; a larger burst is nacked and retried) or 32 MiB (128
# messages of the broker's max message size). With 2,000 a 60 s flood held one round 33 s; with 100
# the overshoot dominated and rounds were no faster (docs/results.md).
UPLINK_LIMITS: Final = {"x-max-length": 500, "x-max-length-bytes": 32 * 1024 * 1024, "x-overflow": "reject-publish"}
# dead.dropped only needs to hold what arrives while its consumer (the aggregator) is away.
DROPPED_LIMITS: Final = {"x-max-length": 100_000, "x-max-length-bytes": 64 * 1024 * 1024, "x-overflow": "drop-head"}
# A device queue holds the tasks and merged masks an offline board has not read; a board is not sampled
# while it owes an update, so an honest one never has more than a few. The oldest go first (they are
# stale), dead-lettered with reason maxlen.
DEVICE_QUEUE_MAX_LENGTH: Final = 100


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: Literal["topic", "direct", "fanout"]


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    """The topology as data: declared over AMQP here, over the management HTTP API by ops/control/enrolment.py,
    and written out in broker_config/definitions.json (a test checks the three agree)."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()


def topology(namespace: str = "") -> Topology:
    ns = namespace
    return Topology(
        exchanges=(
            ExchangeSpec(ns + UPLINK_EXCHANGE, "topic"),
            ExchangeSpec(ns + DOWNLINK_EXCHANGE, "direct"),
            ExchangeSpec(ns + DEAD_EXCHANGE, "fanout"),
            ExchangeSpec(ns + DROPPED_EXCHANGE, "fanout"),
        ),
        queues=(
            QueueSpec(ns + AGGREGATOR_QUEUE, {"x-queue-type": "quorum", "x-dead-letter-exchange": ns + DEAD_EXCHANGE,
                                              **UPLINK_LIMITS, "x-delivery-limit": UPLINK_DELIVERY_LIMIT}),
            QueueSpec(ns + DEAD_QUEUE, {**DEAD_LETTER_LIMITS, "x-dead-letter-exchange": ns + DROPPED_EXCHANGE}),
            QueueSpec(ns + DROPPED_QUEUE, dict(DROPPED_LIMITS)),
        ),
        bindings=(
            BindingSpec(ns + UPLINK_EXCHANGE, ns + AGGREGATOR_QUEUE, UPLINK_BINDING),
            BindingSpec(ns + DEAD_EXCHANGE, ns + DEAD_QUEUE, ""),
            BindingSpec(ns + DROPPED_EXCHANGE, ns + DROPPED_QUEUE, ""),
        ),
    )


def device_topology(device_id: str, namespace: str = "") -> Topology:
    """A device's queue (classic: one per device, quorum queues would cost a Raft group each) and its
    downlink binding; rejected tasks, and the oldest ones past DEVICE_QUEUE_MAX_LENGTH, dead-letter like
    uplink messages do."""
    q = device_queue(device_id, namespace)
    return Topology(
        queues=(QueueSpec(q, {"x-dead-letter-exchange": namespace + DEAD_EXCHANGE,
                              "x-max-length": DEVICE_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"}),),
        bindings=(BindingSpec(namespace + DOWNLINK_EXCHANGE, q, device_id),),
    )


def _declare(channel: Any, topo: Topology) -> None:
    for ex in topo.exchanges:
        channel.exchange_declare(exchange=ex.name, exchange_type=ex.type, durable=True)
    for q in topo.queues:
        try:
            channel.queue_declare(queue=q.name, durable=True, arguments=dict(q.arguments))
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            # RabbitMQ refuses to change a queue's arguments, and we must not delete a queue that may hold
            # updates: say how to move it out of the way.
            raise AmqpError(f"queue {q.name} exists with other arguments than this release declares ({e.reply_text}); "
                            "it was declared by an older release (before the queue limits and the delivery "
                            "limit): stop the aggregator, let the queue drain, delete it (rabbitmqctl delete_queue "
                            f"-p <vhost> --if-empty {q.name}) and start again, as docs/deployment.md ('Upgrading "
                            "the queue limits') shows", code=406) from e
    for b in topo.bindings:
        channel.queue_bind(queue=b.queue, exchange=b.exchange, routing_key=b.routing_key)


def declare_topology(channel: Any, *, namespace: str = "", device_ids: tuple[str, ...] = ()) -> None:
    """Idempotent: exchanges, the aggregator's quorum queue with its dead-letter exchange, dead.letters,
    and the queues of `device_ids` as enrolment declares them (device_topology). In production the
    aggregator passes no devices: enrolment declares each device's queue over the management API."""
    with _amqp_errors("declare topology", "the given channel"):
        _declare(channel, topology(namespace))
        for device_id in device_ids:
            _declare(channel, device_topology(device_id, namespace))


def delete_topology(settings: AmqpSettings, *, device_ids: tuple[str, ...] = ()) -> None:
    """Delete the (namespaced) queues and exchanges, messages included: test teardown only."""
    ns = settings.namespace
    topo = topology(ns)
    queues = [q.name for q in topo.queues] + [device_queue(d, ns) for d in device_ids]
    connection = _connect(settings, "teardown")
    try:
        with _amqp_errors("delete topology", settings.redacted()):
            channel = connection.channel()
            for name in queues:
                channel.queue_delete(queue=name)
            for ex in topo.exchanges:
                channel.exchange_delete(exchange=ex.name)
    finally:
        _close_quietly(connection)
