"""RabbitMQ adapter: the only package in the project that imports pika.

Everything pika raises is translated into `AmqpError` here (connection.py), so callers see the
project's own errors. The package is split by job, and callers import from `shared.amqp` itself:

  settings.py         AmqpSettings (URL, heartbeat, prefetch, namespace, TLS), AmqpError, device names
  connection.py       connecting and error translation; open_channel, queue_depth
  broker_topology.py  the exchanges, queues and bindings as data; declare_topology, delete_topology
  publisher.py        Publisher: confirmed uplink and downlink publishes
  publisher_pool.py   PublisherPool: a few Publishers side by side, for a close's many downlinks
  consumer.py         Consumer: manual acks, a handler thread, dead letters
  batch_consumer.py   BatchConsumer: the same, a prefetch window handed to the handler as one batch
  delivery.py         Delivery and Outcome, what a handler takes and returns
  untrusted.py        a board's properties read without trusting them: total decoding, clean dead letters
"""

from shared.amqp.batch_consumer import BatchConsumer, BatchHandler
from shared.amqp.broker_topology import (
    AGGREGATOR_QUEUE,
    DEAD_EXCHANGE,
    DEAD_LETTER_LIMITS,
    DEAD_QUEUE,
    DEVICE_QUEUE_MAX_LENGTH,
    DOWNLINK_EXCHANGE,
    DROPPED_EXCHANGE,
    DROPPED_LIMITS,
    DROPPED_QUEUE,
    UPLINK_BINDING,
    UPLINK_EXCHANGE,
    UPLINK_LIMITS,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Topology,
    declare_topology,
    delete_topology,
    device_topology,
    topology,
)
from shared.amqp.connection import open_channel, queue_depth
from shared.amqp.consumer import MAX_REASON_CHARS, REASON_HEADER, Consumer, DeadLetterMode, Delivery, Outcome
from shared.amqp.publisher import CONTENT_TYPE, Publisher
from shared.amqp.publisher_pool import PublisherPool
from shared.amqp.settings import (
    DEVICE_QUEUE_PREFIX,
    AmqpError,
    AmqpSettings,
    device_of_user,
    device_queue,
    device_user,
    validate_device_id,
    vhost_user_prefix,
)

__all__ = [
    "AGGREGATOR_QUEUE",
    "CONTENT_TYPE",
    "DEAD_EXCHANGE",
    "DEAD_LETTER_LIMITS",
    "DEAD_QUEUE",
    "DEVICE_QUEUE_MAX_LENGTH",
    "DEVICE_QUEUE_PREFIX",
    "DOWNLINK_EXCHANGE",
    "DROPPED_EXCHANGE",
    "DROPPED_LIMITS",
    "DROPPED_QUEUE",
    "MAX_REASON_CHARS",
    "REASON_HEADER",
    "UPLINK_BINDING",
    "UPLINK_EXCHANGE",
    "UPLINK_LIMITS",
    "AmqpError",
    "AmqpSettings",
    "BatchConsumer",
    "BatchHandler",
    "BindingSpec",
    "Consumer",
    "DeadLetterMode",
    "Delivery",
    "ExchangeSpec",
    "Outcome",
    "Publisher",
    "PublisherPool",
    "QueueSpec",
    "Topology",
    "declare_topology",
    "delete_topology",
    "device_of_user",
    "device_queue",
    "device_topology",
    "device_user",
    "open_channel",
    "queue_depth",
    "topology",
    "validate_device_id",
    "vhost_user_prefix",
]
