"""ops.services.local_servers: the one start-if-installed-and-not-running helper, for RabbitMQ and Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ops.services import local_servers
from ops.services.deployment import Deployment
from ops.services.local_servers import RABBITMQ, REDIS, ensure_redis, start_if_needed, stop_started
from shared.errors import FedMaskError


def _dep(tmp_path: Path, host: str = "127.0.0.1") -> Deployment:
    return Deployment(amqp_url=f"amqp://guest:guest@{host}:5672/fedmask", redis_url=f"redis://{host}:6399/0",
                      run_dir=tmp_path)


def test_a_running_server_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_servers, "reachable", lambda _h, _p: True)
    said: list[str] = []
    start_if_needed(REDIS, ("127.0.0.1", 6399), _dep(tmp_path), said.append, lambda: pytest.fail("started"))
    assert said == ["redis      up on 127.0.0.1:6399"]
    assert not _dep(tmp_path).started_file.exists()


@pytest.mark.parametrize(("server", "package", "env"), [(RABBITMQ, "rabbitmq-server", "FEDMASK_AMQP_URL"),
                                                         (REDIS, "redis-server", "FEDMASK_REDIS_URL")])
def test_refusals_say_what_to_install_or_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Any,
                                             package: str, env: str) -> None:
    monkeypatch.setattr(local_servers, "reachable", lambda _h, _p: False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(FedMaskError, match=f"{server.title} at 10.0.0.9:1 is not reachable \\({env}\\)"):
        start_if_needed(server, ("10.0.0.9", 1), _dep(tmp_path), print, lambda: [])
    with pytest.raises(FedMaskError, match=f"not running and not installed.*`apt install {package}`.*set {env}"):
        start_if_needed(server, ("localhost", 1), _dep(tmp_path), print, lambda: [])


def test_a_started_server_is_remembered_and_stopped_by_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broker_config").mkdir()
    (tmp_path / "broker_config" / "redis.conf").write_text("appendonly yes\naclfile /etc/redis/users.acl\nport 6379\n")
    monkeypatch.setattr(local_servers, "ROOT", tmp_path)
    up = {"now": False}
    monkeypatch.setattr(local_servers, "reachable", lambda _h, _p: up["now"])
    monkeypatch.setattr(local_servers, "wait_port", lambda *_a: None)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    ran: list[list[str]] = []

    def run(cmd: list[str], **_kw: Any) -> None:
        ran.append(cmd)
        up["now"] = True

    monkeypatch.setattr(subprocess, "run", run)
    dep, said = _dep(tmp_path / "run"), list[str]()
    dep.run_dir.mkdir()
    ensure_redis(dep, said.append)
    conf = Path(ran[0][1])
    assert ran[0][0] == "redis-server" and conf.parent == dep.run_dir / "redis"
    lines = conf.read_text().splitlines()
    assert "appendonly yes" in lines and "port 6399" in lines and not any(x.startswith("aclfile") for x in lines)
    assert json.loads(dep.started_file.read_text()) == ["redis"]
    assert said == ["starting redis-server (AOF on, data in the run dir) ...", "redis      up on 127.0.0.1:6399"]
    stop_started(dep, said.append)
    assert ran[1] == ["redis-cli", "-p", "6399", "shutdown"] and not dep.started_file.exists()
    assert said[-1] == "redis-server stopped (make up had started it)"
