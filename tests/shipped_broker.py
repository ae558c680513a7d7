"""A private RabbitMQ node (tests/private_services.py) running the shipped broker_config/rabbitmq.conf.

Every line of the shipped file is kept except the listener and definitions lines: PrivateRabbitMQ
puts the node on free loopback ports of its own, and the shipped definitions would replace `guest`
(which PrivateRabbitMQ administers the node with) by users with placeholder passwords. The topology
those definitions hold is declared by the code under test instead (tests check both agree).
"""

from __future__ import annotations

from pathlib import Path

from tests.private_services import PrivateRabbitMQ, rabbitmq_installed

ROOT = Path(__file__).resolve().parents[1]
_NOT_OURS = ("listeners.", "management.tcp.", "definitions.")


def shipped_config() -> str:
    lines = (ROOT / "broker_config" / "rabbitmq.conf").read_text().splitlines()
    return "\n".join(line for line in lines if not line.split("=", 1)[0].strip().startswith(_NOT_OURS))


def shipped_node(directory: Path) -> PrivateRabbitMQ:
    return PrivateRabbitMQ(directory, config=shipped_config())


__all__ = ["rabbitmq_installed", "shipped_config", "shipped_node"]
