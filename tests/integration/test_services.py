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


def _cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "FEDMASK_NO_DOCKER": "1", **env}  # the local path is what this machine can run
    if cwd is not None:  # run from another folder: the repository must still be importable
        full["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "ops.cli", "services", *args], capture_output=True, text=True,
                          timeout=180, env=full, cwd=cwd)


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
        recorded = RoundStore.from_url(redis_service_url).config()
        assert recorded["width"] == "32"
        assert recorded["amqp_address"].endswith(f"/{vhost}") and "guest" not in recorded["amqp_address"]
        down = _cli("down", *args)
        assert down.returncode == 0 and aggregator_pid(dep) is None
        assert "aggregator stopped" in (tmp_path / "aggregator.log").read_text()  # drained, not killed
        assert _cli("status", *args).returncode == 1
    finally:
        if (pid := aggregator_pid(dep)) is not None:
            os.kill(pid, 9)
        mgmt.delete_vhost(vhost)


def test_status_finds_the_aggregator_from_any_folder(amqp_service_url: str, redis_service_url: str,
                                                     tmp_path: Path) -> None:
    """No --run-dir: the state lives in one per-user place (here $XDG_STATE_HOME), not the working folder."""
    from ops.control.enrolment import Management

    vhost = f"fedmask-test-{uuid.uuid4().hex[:8]}"
    Management().ensure_vhost(vhost)
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    args = ["--amqp-url", with_vhost(amqp_service_url, vhost), "--redis-url", redis_service_url]
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    dep = Deployment(amqp_url=args[1], redis_url=redis_service_url, run_dir=tmp_path / "state" / "fedmask" / "services")
    try:
        up = _cli("up", "--task", "digits", "--width", "32", *args, **state)
        assert up.returncode == 0, up.stderr
        st = _cli("status", "--json", *args, cwd=elsewhere, **state)
        assert st.returncode == 0, st.stdout + st.stderr
        assert json.loads(st.stdout)["aggregator"]["pid"] == aggregator_pid(dep) is not None
        assert _cli("down", *args, cwd=elsewhere, **state).returncode == 0
    finally:
        if (pid := aggregator_pid(dep)) is not None:
            os.kill(pid, 9)
        Management().delete_vhost(vhost)


def test_unreachable_remote_service_says_what_to_do(tmp_path: Path) -> None:
    res = _cli("up", "--amqp-url", "amqp://u:p@192.0.2.1:5672/x", "--redis-url", "redis://127.0.0.1:6379/15",
               "--run-dir", str(tmp_path))
    assert res.returncode != 0 and "not reachable (FEDMASK_AMQP_URL)" in res.stderr
