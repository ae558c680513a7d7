"""The aggregator refuses a Redis that would ack updates before they reach the disk
(aggregator/store_durability.py), against redis-servers of the test's own (one per fsync policy)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import RoundStore
from aggregator.store_durability import require_ack_durability
from shared.errors import ConfigError
from tests.private_services import PrivateRedis
from tests.services import missing

pytestmark = pytest.mark.services


@pytest.fixture(params=["always", "everysec"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, RoundStore]]:
    if shutil.which("redis-server") is None:
        missing("redis-server")
    with PrivateRedis(tmp_path / "redis", appendfsync=request.param) as redis_server:
        store = RoundStore.from_url(redis_server.url())
        yield request.param, store
        store.close()


def test_only_fsync_on_every_write_counts_as_durable(server: tuple[str, RoundStore],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    policy, store = server
    found = store.ack_durability()
    assert (found.appendonly, found.appendfsync) == ("yes", policy)
    caplog.set_level(logging.INFO, "fedmask.aggregator")
    if policy == "always":
        assert found.verdict == "durable"
        require_ack_durability(found, "fsync", "test")
        assert "durable before it is acked" in caplog.text
        return
    assert found.verdict == "not_durable"
    with pytest.raises(ConfigError, match=r"appendfsync everysec.*--ack-durability unchecked"):
        require_ack_durability(found, "fsync", "test")
    require_ack_durability(found, "unchecked", "test")  # the operator accepted the risk: a warning
    assert "loses the updates of the last second (accepted" in caplog.text


def test_waiting_for_replicas_makes_an_everysec_master_acceptable(tmp_path: Path) -> None:
    """?replicas=N: every update is acked only once N replicas hold it (WAIT), so the master's own
    appendfsync no longer decides (the Sentinel fault test runs such a master with everysec)."""
    if shutil.which("redis-server") is None:
        missing("redis-server")
    with PrivateRedis(tmp_path / "redis", appendfsync="everysec") as redis_server:
        store = RoundStore.from_url(redis_server.url() + "?replicas=1")
        try:
            found = store.ack_durability()
        finally:
            store.close()
    assert (found.verdict, found.replicas, found.appendfsync) == ("durable", 1, "everysec")
    require_ack_durability(found, "fsync", "test")  # accepted: no ConfigError
    assert "1 replica(s) hold it" in found.describe()
