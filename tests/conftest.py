"""Fixtures for tests that need real RabbitMQ and Redis (see tests/services.py for the lookup order)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import amqp_url, redis_url


@pytest.fixture(scope="session")
def amqp_service_url() -> Iterator[str]:
    with amqp_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_service_url() -> Iterator[str]:
    with redis_url() as url:
        yield url
