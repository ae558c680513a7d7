"""`fedmask services up | status | down` (what `make up | status | down` run) against the real
broker and Redis: the aggregator starts in the background with a pid and a log file, reports its
model in Redis, drains on down, and status exits non-zero when something is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ops.fleet.workers import with_vhost
from ops.services.aggregator_process import aggregator_pid
from ops.services.deployment import Deployment

pytestmark = pytest.mark.services


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDMASK_NO_DOCKER": "1"}  # the local path is what this machine can run
    return subprocess.run([sys.executable, "-m", "ops.cli", "services", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def test_up_status_down(amqp_service_url: str, redis_service_url: str, tmp_path: Path) -> None:
    from aggregator.store import RoundStore
    from ops.control.enrolment import Management

    vhost = f"fedmask-test-{uuid.uuid4().hex[:8]}"
    mgmt = Management()
    amqp = with_vhost(amqp_service_url, vhost)
    args = ["--amqp-url", amqp, "--redis-url", redis_service_url, "--run-dir", str(tmp_path)]
    dep = Deployment(amqp_url=amqp, redis_url=redis_service_url, run_dir=tmp_path)
    try:
        before = _cli("status", "--json", *args)
        assert before.returncode == 1 and json.loads(before.stdout)["aggregator"]["up"] is False
        up = _cli("up", "--task", "digits", "--width", "32", *args)
        assert up.returncode == 0, up.stderr
        pid = aggregator_pid(dep)
        assert pid is not None and "aggregator up" in (tmp_path / "aggregator.log").read_text()
        again = _cli("up", "--task", "digits", "--width", "32", *args)  # idempotent: no second aggregator
        assert again.returncode == 0 and aggregator_pid(dep) == pid and "already running" in again.stderr
        st = _cli("status", "--json", *args)
        assert st.returncode == 0, st.stdout
        payload = json.loads(st.stdout)
        assert payload["aggregator"]["pid"] == pid and payload["aggregator"]["config"]["task"] == "digits"
        assert RoundStore.from_url(redis_service_url).config()["width"] == "32"
        down = _cli("down", *args)
        assert down.returncode == 0 and aggregator_pid(dep) is None
        assert "aggregator stopped" in (tmp_path / "aggregator.log").read_text()  # drained, not killed
        assert _cli("status", *args).returncode == 1
    finally:
        if (pid := aggregator_pid(dep)) is not None:
            os.kill(pid, 9)
        mgmt.delete_vhost(vhost)


def test_unreachable_remote_service_says_what_to_do(tmp_path: Path) -> None:
    res = _cli("up", "--amqp-url", "amqp://u:p@192.0.2.1:5672/x", "--redis-url", "redis://127.0.0.1:6379/15",
               "--run-dir", str(tmp_path))
    assert res.returncode != 0 and "not reachable (FEDMASK_AMQP_URL)" in res.stderr
