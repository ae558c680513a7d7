"""Fixtures for tests that need real RabbitMQ and Redis (see tests/services.py for the lookup order),
and the session-wide proof that the machine's own services were left as found."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.machine_services import Snapshot, management_url_for
from tests.services import LOCAL_AMQP, LOCAL_REDIS, _reachable, amqp_url, redis_url


@pytest.fixture(scope="session")
def amqp_service_url() -> Iterator[str]:
    with amqp_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_service_url() -> Iterator[str]:
    with redis_url() as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def machine_services_untouched() -> Iterator[None]:
    """Fails the session if any test stopped, restarted or reconfigured the machine's RabbitMQ or Redis
    (tests/machine_services.py says what is compared). Only for the local services, when they run."""
    local = not os.environ.get("FEDMASK_TEST_AMQP_URL") and not os.environ.get("FEDMASK_TEST_REDIS_URL")
    if not (local and _reachable(LOCAL_AMQP) and _reachable(LOCAL_REDIS)):
        yield
        return
    snapshot = Snapshot(LOCAL_AMQP, LOCAL_REDIS, management_url_for(LOCAL_AMQP))
    try:
        snapshot.take()
    except Exception as exc:  # e.g. the management API is off: the enrolment tests will say so
        print(f"\nmachine services not snapshotted: {exc!r}")
        snapshot.release()
        yield
        return
    yield
    try:
        problems = snapshot.problems()
    finally:
        snapshot.release()
    assert not problems, "the test session changed the machine's own services:\n- " + "\n- ".join(problems)


# `make test` runs one or two representative cases of each fault family and each pipeline variant;
# the rest (marked `exhaustive`) run under FEDMASK_EXHAUSTIVE=1: `make faults` and `make test-all`.
# This keeps `make test` near its time budget on a 2-core machine without dropping any family.
EXHAUSTIVE_ENV = "FEDMASK_EXHAUSTIVE"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(EXHAUSTIVE_ENV) == "1":
        return
    drop = [it for it in items if it.get_closest_marker("exhaustive") is not None]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it.get_closest_marker("exhaustive") is None]
