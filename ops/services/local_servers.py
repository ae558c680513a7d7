"""RabbitMQ and Redis on this machine: started if they are local, installed and not running, and
remembered in the run dir, so that `down` stops only what `up` started."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.services.deployment import LOCAL_HOSTS, MANAGEMENT_PORT, ROOT, Deployment, reachable, wait_port
from shared.errors import FedMaskError


@dataclass(frozen=True)
class LocalServer:
    name: str  # "rabbitmq" | "redis": the status line and the entry in started.json
    title: str  # for messages
    executable: str  # must be on PATH to start it; also its Debian/Ubuntu package name
    url_env: str  # the variable that points elsewhere instead
    start_timeout_s: float
    start_note: str = ""


RABBITMQ = LocalServer("rabbitmq", "RabbitMQ", "rabbitmq-server", "FEDMASK_AMQP_URL", 120)
REDIS = LocalServer("redis", "Redis", "redis-server", "FEDMASK_REDIS_URL", 30, " (AOF on, data in the run dir)")


def started_here(dep: Deployment) -> list[str]:
    return json.loads(dep.started_file.read_text()) if dep.started_file.exists() else []


def _remember(dep: Deployment, name: str) -> None:
    dep.started_file.write_text(json.dumps(sorted({*started_here(dep), name})))


def start_if_needed(server: LocalServer, address: tuple[str, int], dep: Deployment, say: Any,
                    command: Callable[[], list[str]]) -> None:
    """Start `server` with `command` unless it already answers at `address`; when it cannot be
    started (not local, not installed), say what to install or set."""
    host, port = address
    if not reachable(host, port):
        if host not in LOCAL_HOSTS:
            raise FedMaskError(f"{server.title} at {host}:{port} is not reachable ({server.url_env})")
        if shutil.which(server.executable) is None:
            raise FedMaskError(f"{server.title} is not running and not installed: install it (Debian/Ubuntu: "
                               f"`apt install {server.executable}`), or install Docker, or set {server.url_env}")
        say(f"starting {server.executable}{server.start_note} ...")
        subprocess.run(command(), check=True, capture_output=True)
        _remember(dep, server.name)
        wait_port(host, port, server.start_timeout_s, server.title)
    say(f"{server.name:<10} up on {host}:{port}")


def ensure_rabbitmq(dep: Deployment, say: Any) -> None:
    """Start the machine's rabbitmq-server with the shipped configuration (local_rabbitmq_conf) unless
    a broker already answers; a running one is used as it is (`services status` shows how its limits
    differ from the shipped ones)."""
    start_if_needed(RABBITMQ, dep.amqp_host, dep, say, lambda: _rabbitmq_command(dep))
    host = dep.amqp_host[0]
    if RABBITMQ.name in started_here(dep):  # the shipped enabled_plugins file starts the management plugin
        wait_port(host, MANAGEMENT_PORT, 60, "the RabbitMQ management API")
    if host in LOCAL_HOSTS and not reachable(host, MANAGEMENT_PORT) and shutil.which("rabbitmq-plugins"):
        say("enabling the management plugin (device enrolment uses its HTTP API) ...")
        subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_management"], check=True, capture_output=True)
        wait_port(host, MANAGEMENT_PORT, 60, "the RabbitMQ management API")


def _rabbitmq_command(dep: Deployment) -> list[str]:
    """`rabbitmq-server -detached` under env(1), so the distribution wrapper (which keeps the
    environment when it switches to the rabbitmq user) hands the shipped files to the node."""
    conf = local_rabbitmq_conf(dep)
    return ["env", f"RABBITMQ_CONFIG_FILE={conf}", f"RABBITMQ_ENABLED_PLUGINS_FILE={conf.parent / 'enabled_plugins'}",
            "rabbitmq-server", "-detached"]


def local_rabbitmq_conf(dep: Deployment) -> Path:
    """broker_config/rabbitmq.conf for a broker `make up` starts: every limit as shipped (max message
    size, alarms, heartbeat, consumer timeout, loopback listeners), the AMQP listener on the
    deployment's port, and without the definitions.* lines: the shipped definitions replace `guest`
    with users whose passwords are placeholders, which a development URL does not know; the
    aggregator declares the same topology (shared/amqp/broker_topology.py) when it starts.

    Written with broker_config/enabled_plugins to <run dir>/rabbitmq when the `rabbitmq` user the
    broker runs as can reach that folder, else to a folder of the temp dir (the run dir is in the
    operator's home, often mode 700)."""
    out = dep.run_dir / "rabbitmq"
    if not all(os.stat(p).st_mode & 0o001 for p in [*dep.run_dir.resolve().parents][::-1] if p.exists()):
        digest = hashlib.sha256(str(dep.run_dir.resolve()).encode()).hexdigest()[:8]
        out = Path(tempfile.gettempdir()) / f"fedmask-rabbitmq-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)  # read by the rabbitmq user
    plugins = out / "enabled_plugins"
    plugins.write_text((ROOT / "broker_config" / "enabled_plugins").read_text())
    plugins.chmod(0o644)
    host, port = dep.amqp_host
    lines = []
    for line in (ROOT / "broker_config" / "rabbitmq.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key.startswith("definitions."):
            continue
        if key == "listeners.tcp.local":
            line = f"listeners.tcp.local = {host if host != 'localhost' else '127.0.0.1'}:{port}"
        lines.append(line)
    conf = out / "rabbitmq.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return conf.resolve()


def ensure_redis(dep: Deployment, say: Any) -> None:
    port = dep.redis_host[1]
    start_if_needed(REDIS, dep.redis_host, dep, say, lambda: ["redis-server", str(_local_redis_conf(dep, port))])


def _local_redis_conf(dep: Deployment, port: int) -> Path:
    """broker_config/redis.conf, minus the production-only paths (ACL file, data dir) that a
    development machine does not have; data and log go to the run dir."""
    data = dep.run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    keep = [line for line in (ROOT / "broker_config" / "redis.conf").read_text().splitlines()
            if line.split(" ", 1)[0] not in ("aclfile", "dir", "port", "daemonize", "logfile", "pidfile")]
    conf = data / "redis.conf"
    conf.write_text("\n".join([*keep, f"port {port}", f"dir {data.resolve()}", "daemonize yes",
                               f"logfile {(data / 'redis.log').resolve()}",
                               f"pidfile {(data / 'redis.pid').resolve()}"]) + "\n")
    return conf


def stop_started(dep: Deployment, say: Any) -> None:
    """Stop the servers `up` started (never ones that were already running), then forget them."""
    started = started_here(dep)
    if REDIS.name in started:
        subprocess.run(["redis-cli", "-p", str(dep.redis_host[1]), "shutdown"], capture_output=True)
        say("redis-server stopped (make up had started it)")
    if RABBITMQ.name in started:
        subprocess.run(["rabbitmqctl", "stop"], capture_output=True)
        say("rabbitmq-server stopped (make up had started it)")
    dep.started_file.unlink(missing_ok=True)
