"""The transport seam between devices and the aggregator.

Round logic only ever sees `Transport`. The simulator uses `InMemoryTransport`; the pipeline
uses the RabbitMQ adapter, which implements the same protocol. Every body is encoded bytes,
so byte accounting is the same in both.
"""

from __future__ import annotations

import builtins
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from shared.errors import FedMaskError


class DeviceUnreachable(FedMaskError):
    """A downlink could not be delivered: the board's queue is gone (a removed or reset board). The
    aggregator keeps the message's content in Redis and gives it to the board when it says hello."""

    def __init__(self, device_id: str, detail: str = "") -> None:
        super().__init__(f"device {device_id} cannot be reached{': ' + detail if detail else ''}")
        self.device_id = device_id


@dataclass(frozen=True)
class Envelope:
    """One delivered message: routing key as the device published it, the broker-verified user."""

    routing_key: str
    user_id: str
    body: bytes


class Transport(Protocol):
    def publish_uplink(self, device_id: str, kind: str, body: bytes) -> None: ...

    def publish_downlink(self, device_id: str, body: bytes) -> None: ...


@dataclass
class ByteCounter:
    messages: int = 0
    bytes: int = 0

    def add(self, body: builtins.bytes) -> None:
        self.messages += 1
        self.bytes += len(body)


@dataclass
class InMemoryTransport:
    """FIFO queues in process memory. Devices publish as themselves (user_id = device id),
    which mirrors RabbitMQ's user_id check."""

    uplink: deque[Envelope] = field(default_factory=deque)
    downlink: dict[str, deque[bytes]] = field(default_factory=dict)
    up: ByteCounter = field(default_factory=ByteCounter)
    down: ByteCounter = field(default_factory=ByteCounter)
    unreachable: set[str] = field(default_factory=set)  # boards whose queue is gone (tests set this)

    def publish_uplink(self, device_id: str, kind: str, body: bytes) -> None:
        self.up.add(body)
        self.uplink.append(Envelope(f"device.{device_id}.{kind}", device_id, body))

    def publish_downlink(self, device_id: str, body: bytes) -> None:
        if device_id in self.unreachable:
            raise DeviceUnreachable(device_id, "no queue")
        self.down.add(body)
        self.downlink.setdefault(device_id, deque()).append(body)

    def take_uplink(self) -> list[Envelope]:
        out = list(self.uplink)
        self.uplink.clear()
        return out

    def take_downlink(self, device_id: str) -> list[bytes]:
        q = self.downlink.get(device_id)
        if not q:
            return []
        out = list(q)
        q.clear()
        return out
