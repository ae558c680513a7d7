"""Where the real services are, for tests that need them.

Order, per service: an explicit URL from the environment (FEDMASK_TEST_AMQP_URL,
FEDMASK_TEST_REDIS_URL); a testcontainers container when a Docker engine answers; the local
service on its default port. Absent all three: skip locally, fail under CI=true.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest

LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_REDIS = "redis://127.0.0.1:6379/15"  # db 15: tests never touch db 0


def _reachable(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 0), timeout=1):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def missing(what: str) -> None:
    msg = f"{what} is not reachable (set its URL in the environment, run Docker, or start the local service)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@contextmanager
def amqp_url() -> Iterator[str]:
    explicit = os.environ.get("FEDMASK_TEST_AMQP_URL")
    if explicit:
        yield explicit
        return
    if _reachable(LOCAL_AMQP):
        yield LOCAL_AMQP
        return
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]

        with RabbitMqContainer("rabbitmq:3.13-management") as c:
            yield f"amqp://guest:guest@{c.get_container_host_ip()}:{c.get_exposed_port(5672)}/"
        return
    missing("RabbitMQ")


@contextmanager
def redis_url() -> Iterator[str]:
    explicit = os.environ.get("FEDMASK_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    if _reachable(LOCAL_REDIS):
        yield LOCAL_REDIS
        return
    if _docker_available():
        from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

        with RedisContainer("redis:7") as c:
            yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
        return
    missing("Redis")
