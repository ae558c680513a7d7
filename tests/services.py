"""Where the real services are, for tests that need them.

Order, per service: an explicit URL from the environment (FEDMASK_TEST_AMQP_URL,
FEDMASK_TEST_REDIS_URL); a testcontainers container when a Docker engine answers; the local
service on its default port. Absent all three: skip locally, fail under CI=true.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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
def _service(name: str, env_var: str, local: str, container: Callable[[], Iterator[str]]) -> Iterator[str]:
    """The lookup order of the module docstring, shared by every service."""
    explicit = os.environ.get(env_var)
    if explicit:
        yield explicit
    elif _docker_available():
        yield from container()
    elif _reachable(local):
        yield local
    else:
        missing(name)


def _rabbitmq_container() -> Iterator[str]:
    from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]

    with RabbitMqContainer("rabbitmq:3.13-management") as c:
        yield f"amqp://guest:guest@{c.get_container_host_ip()}:{c.get_exposed_port(5672)}/"


def _redis_container() -> Iterator[str]:
    from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

    with RedisContainer("redis:7") as c:
        yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"


def amqp_url() -> AbstractContextManager[str]:
    return _service("RabbitMQ", "FEDMASK_TEST_AMQP_URL", LOCAL_AMQP, _rabbitmq_container)


def redis_url() -> AbstractContextManager[str]:
    return _service("Redis", "FEDMASK_TEST_REDIS_URL", LOCAL_REDIS, _redis_container)
