"""The broker topology as data (`Topology` and its specs), and declaring and deleting it over AMQP.

Topology (vhost fedmask; every name below is `settings.namespace + NAME`, and the namespace is empty
outside tests):
  fedmask.uplink    topic exchange   devices publish device.<id>.<kind> with user_id = their own user
  aggregator.uplink quorum queue     bound to device.*.*; dead-letters to fedmask.dead; delivery limit
  fedmask.downlink  direct exchange  routing key <id> -> queue device.<id> (classic, dead-letters too)
  fedmask.dead      fanout exchange  -> dead.letters

The same specs are declared over the management HTTP API by ops/control/enrolment.py and written out in
broker_config/definitions.json, so the names live here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from shared.amqp.connection import _amqp_errors, _close_quietly, _connect
from shared.amqp.settings import AmqpError, AmqpSettings, device_queue

UPLINK_EXCHANGE: Final = "fedmask.uplink"
DOWNLINK_EXCHANGE: Final = "fedmask.downlink"
DEAD_EXCHANGE: Final = "fedmask.dead"
AGGREGATOR_QUEUE: Final = "aggregator.uplink"
DEAD_QUEUE: Final = "dead.letters"
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
        ),
        queues=(
            QueueSpec(ns + AGGREGATOR_QUEUE, {"x-queue-type": "quorum", "x-dead-letter-exchange": ns + DEAD_EXCHANGE,
                                              "x-delivery-limit": UPLINK_DELIVERY_LIMIT}),
            QueueSpec(ns + DEAD_QUEUE, {}),
        ),
        bindings=(
            BindingSpec(ns + UPLINK_EXCHANGE, ns + AGGREGATOR_QUEUE, UPLINK_BINDING),
            BindingSpec(ns + DEAD_EXCHANGE, ns + DEAD_QUEUE, ""),
        ),
    )


def device_topology(device_id: str, namespace: str = "") -> Topology:
    """A device's queue (classic: one per device, quorum queues would cost a Raft group each) and its
    downlink binding; rejected tasks dead-letter like uplink messages do."""
    q = device_queue(device_id, namespace)
    return Topology(
        queues=(QueueSpec(q, {"x-dead-letter-exchange": namespace + DEAD_EXCHANGE}),),
        bindings=(BindingSpec(namespace + DOWNLINK_EXCHANGE, q, device_id),),
    )


def _declare(channel: Any, topo: Topology) -> None:
    for ex in topo.exchanges:
        channel.exchange_declare(exchange=ex.name, exchange_type=ex.type, durable=True)
    for q in topo.queues:
        channel.queue_declare(queue=q.name, durable=True, arguments=dict(q.arguments))
    for b in topo.bindings:
        channel.queue_bind(queue=b.queue, exchange=b.exchange, routing_key=b.routing_key)


def declare_topology(channel: Any, *, namespace: str = "", device_ids: tuple[str, ...] = ()) -> None:
    """Idempotent: exchanges, the aggregator's quorum queue with its dead-letter exchange, dead.letters,
    and the queues of `device_ids` as enrolment declares them (device_topology). In production the
    aggregator passes no devices: enrolment declares each device's queue over the management API."""
    try:
        with _amqp_errors("declare topology", "the given channel"):
            _declare(channel, topology(namespace))
            for device_id in device_ids:
                _declare(channel, device_topology(device_id, namespace))
    except AmqpError as err:
        if "x-delivery-limit" not in str(err):
            raise
        # A queue declared before the delivery limit was shipped: RabbitMQ refuses to change a queue's
        # arguments (406 inequivalent arg), and we must not delete a queue that may hold updates.
        raise AmqpError(f"{err}. {namespace + AGGREGATOR_QUEUE} was declared without x-delivery-limit "
                        f"{UPLINK_DELIVERY_LIMIT}: stop the aggregator, let the queue drain, delete it "
                        f"(rabbitmqctl delete_queue -p <vhost> --if-empty {namespace + AGGREGATOR_QUEUE}) and "
                        f"start the aggregator again (docs/deployment.md)", code=err.code, retryable=False) from err


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
