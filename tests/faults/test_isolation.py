"""The session guard of tests/conftest.py can fail: it notices a restarted Redis, a changed Redis
CONFIG and a stopped broker application. Shown on servers of this test's own, never the machine's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.machine_services import Snapshot
from tests.private_services import PrivateRabbitMQ, PrivateRedis, rabbitmq_installed
from tests.services import missing

pytestmark = [pytest.mark.services, pytest.mark.faults]


@pytest.mark.timeout(240)
def test_guard_sees_restarts_and_reconfiguration(tmp_path: Path) -> None:
    if not rabbitmq_installed():
        missing("rabbitmq-server (this case runs a RabbitMQ node of its own)")
    with PrivateRabbitMQ(tmp_path / "rabbitmq") as broker, PrivateRedis(tmp_path / "redis") as server:
        untouched = Snapshot(broker.amqp_url(), server.url(), broker.management_url)
        untouched.take()
        assert untouched.problems() == []
        untouched.release()

        reconfigured = Snapshot(broker.amqp_url(), server.url(), broker.management_url)
        reconfigured.take()
        server.client().config_set("maxmemory", "123mb")
        assert any("CONFIG changed" in p and "maxmemory" in p for p in reconfigured.problems())
        reconfigured.release()

        restarted = Snapshot(broker.amqp_url(), server.url(), broker.management_url)
        restarted.take()
        server.kill()
        server.start()
        broker.stop_app()
        broker.start_app()
        found = restarted.problems()
        restarted.release()
        assert any("run_id" in p for p in found), found
        assert any("connection held since the session began" in p for p in found), found
