"""`Delivery` (what the consumer hands its handler) and `Outcome` (what the handler hands back)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.amqp.untrusted import MAX_REASON_CHARS


@dataclass(frozen=True)
class Delivery:
    routing_key: str
    user_id: str | None  # message property, validated by the broker
    body: bytes
    headers: dict[str, Any]
    redelivered: bool
    delivery_tag: int


@dataclass(frozen=True)
class Outcome:
    """What the consumer does with a delivery: ack it, reject it to dead.letters with a reason
    (a short machine-readable code, at most 256 chars), or requeue it for another try."""

    action: Literal["ack", "reject", "requeue"]
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action not in ("ack", "reject", "requeue"):
            raise ValueError(f"unknown outcome {self.action!r}")
        if self.action == "reject" and not self.reason:
            raise ValueError("a reject needs a reason")

    @staticmethod
    def ack() -> Outcome:
        return Outcome("ack")

    @staticmethod
    def reject(reason: str) -> Outcome:
        return Outcome("reject", reason[:MAX_REASON_CHARS])

    @staticmethod
    def requeue() -> Outcome:
        return Outcome("requeue")
