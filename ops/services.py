"""`make up | down | status`: bring up RabbitMQ, Redis and the aggregator on one machine.

Where a Docker engine answers, ops/deploy/docker-compose.yml runs all three. Otherwise the services at
FEDMASK_AMQP_URL / FEDMASK_REDIS_URL are used; if they are local and not running, the machine's own
rabbitmq-server and redis-server are started (and remembered, so `down` stops only what `up`
started); the aggregator runs in the background with a pid file and a log file in the run dir.
When none of that is possible, the error says what to install or set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.errors import FedMaskError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "ops" / "deploy" / "docker-compose.yml"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MANAGEMENT_PORT = 15672


def _reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port(host: str, port: int, seconds: float, what: str) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if _reachable(host, port):
            return
        time.sleep(0.5)
    raise FedMaskError(f"{what} did not come up on {host}:{port} within {seconds:.0f}s")


def docker_available() -> bool:
    if os.environ.get("FEDMASK_NO_DOCKER") or shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass(frozen=True)
class Deployment:
    amqp_url: str
    redis_url: str
    run_dir: Path
    task: str = "activity"
    width: int | None = None
    seed: int = 0
    merge: str = "head"

    @property
    def amqp_host(self) -> tuple[str, int]:
        u = urlsplit(self.amqp_url)
        return u.hostname or "127.0.0.1", u.port or (5671 if u.scheme == "amqps" else 5672)

    @property
    def redis_host(self) -> tuple[str, int]:
        u = urlsplit(self.redis_url)
        return u.hostname or "127.0.0.1", u.port or 6379

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "aggregator.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "aggregator.log"

    @property
    def started_file(self) -> Path:
        return self.run_dir / "started.json"


# -- local broker and Redis ---------------------------------------------------------------------
def _remember(dep: Deployment, name: str) -> None:
    started = json.loads(dep.started_file.read_text()) if dep.started_file.exists() else []
    dep.started_file.write_text(json.dumps(sorted({*started, name})))


def ensure_rabbitmq(dep: Deployment, say: Any) -> None:
    host, port = dep.amqp_host
    if not _reachable(host, port):
        if host not in LOCAL_HOSTS:
            raise FedMaskError(f"RabbitMQ at {host}:{port} is not reachable (FEDMASK_AMQP_URL)")
        if shutil.which("rabbitmq-server") is None:
            raise FedMaskError("RabbitMQ is not running and not installed: install it (Debian/Ubuntu: "
                               "`apt install rabbitmq-server`), or install Docker, or set FEDMASK_AMQP_URL")
        say("starting rabbitmq-server ...")
        subprocess.run(["rabbitmq-server", "-detached"], check=True, capture_output=True)
        _remember(dep, "rabbitmq")
        _wait_port(host, port, 120, "RabbitMQ")
    say(f"rabbitmq   up on {host}:{port}")
    if host in LOCAL_HOSTS and not _reachable(host, MANAGEMENT_PORT) and shutil.which("rabbitmq-plugins"):
        say("enabling the management plugin (device enrolment uses its HTTP API) ...")
        subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_management"], check=True, capture_output=True)
        _wait_port(host, MANAGEMENT_PORT, 60, "the RabbitMQ management API")


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


def ensure_redis(dep: Deployment, say: Any) -> None:
    host, port = dep.redis_host
    if not _reachable(host, port):
        if host not in LOCAL_HOSTS:
            raise FedMaskError(f"Redis at {host}:{port} is not reachable (FEDMASK_REDIS_URL)")
        if shutil.which("redis-server") is None:
            raise FedMaskError("Redis is not running and not installed: install it (Debian/Ubuntu: "
                               "`apt install redis-server`), or install Docker, or set FEDMASK_REDIS_URL")
        say("starting redis-server (AOF on, data in the run dir) ...")
        subprocess.run(["redis-server", str(_local_redis_conf(dep, port))], check=True, capture_output=True)
        _remember(dep, "redis")
        _wait_port(host, port, 30, "Redis")
    say(f"redis      up on {host}:{port}")


# -- the aggregator process ---------------------------------------------------------------------
def aggregator_pid(dep: Deployment) -> int | None:
    """The pid in the pid file if that process is alive (a stale pid file is removed)."""
    try:
        pid = int(dep.pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError):
        return None
    except ProcessLookupError:
        dep.pid_file.unlink(missing_ok=True)
        return None
    except PermissionError:
        return int(dep.pid_file.read_text().strip())


def start_aggregator(dep: Deployment, say: Any, wait_s: float = 120.0) -> int:
    pid = aggregator_pid(dep)
    if pid is not None:
        say(f"aggregator already running (pid {pid}, log {dep.log_file})")
        return pid
    cmd = [sys.executable, "-m", "ops.cli", "aggregator", "run", "--amqp-url", dep.amqp_url, "--redis-url",
           dep.redis_url, "--task", dep.task, "--seed", str(dep.seed), "--merge", dep.merge]
    if dep.width is not None:
        cmd += ["--width", str(dep.width)]
    log = dep.log_file.open("a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    dep.pid_file.write_text(f"{proc.pid}\n")
    start, mark = time.time(), dep.log_file.stat().st_size
    while time.time() - start < wait_s:
        if proc.poll() is not None:
            dep.pid_file.unlink(missing_ok=True)
            raise FedMaskError(f"the aggregator exited with code {proc.returncode}:\n{_tail(dep.log_file, mark)}")
        if "aggregator up" in dep.log_file.read_text()[mark:]:
            say(f"aggregator up (pid {proc.pid}, task {dep.task}, log {dep.log_file})")
            return proc.pid
        time.sleep(0.3)
    raise FedMaskError(f"the aggregator did not report ready within {wait_s:.0f}s; see {dep.log_file}")


def _tail(path: Path, start: int = 0, lines: int = 15) -> str:
    return "\n".join(path.read_text()[start:].splitlines()[-lines:])


def stop_aggregator(dep: Deployment, say: Any, drain_s: float = 60.0) -> None:
    pid = aggregator_pid(dep)
    if pid is None:
        say("aggregator not running")
        return
    os.kill(pid, signal.SIGTERM)  # drains: nothing unpersisted is acked
    end = time.time() + drain_s
    while time.time() < end and aggregator_pid(dep) is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (the demo starts it in-process)
        time.sleep(0.2)
    if aggregator_pid(dep) is not None:
        say(f"aggregator (pid {pid}) did not drain within {drain_s:.0f}s: killing it")
        os.kill(pid, signal.SIGKILL)
    dep.pid_file.unlink(missing_ok=True)
    say(f"aggregator stopped (pid {pid})")


# -- the three commands ---------------------------------------------------------------------------
def up(dep: Deployment, say: Any) -> str:
    """Returns "docker" or "local": how the services run."""
    dep.run_dir.mkdir(parents=True, exist_ok=True)
    if docker_available() and COMPOSE_FILE.exists():
        say("Docker found: starting ops/deploy/docker-compose.yml (rabbitmq, redis, aggregator) ...")
        subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "up", "-d", "--build", "--wait"], check=True)
        return "docker"
    ensure_rabbitmq(dep, say)
    ensure_redis(dep, say)
    from ops.control.enrolment import Management

    vhost = urlsplit(dep.amqp_url).path.lstrip("/") or "/"
    host = dep.amqp_host[0]
    if _reachable(host, MANAGEMENT_PORT):  # devices are enrolled into this vhost
        u = urlsplit(dep.amqp_url)
        Management(f"http://{host}:{MANAGEMENT_PORT}", u.username or "guest", u.password or "guest").ensure_vhost(vhost)
    start_aggregator(dep, say)
    return "local"


def down(dep: Deployment, say: Any) -> None:
    if docker_available() and COMPOSE_FILE.exists() and aggregator_pid(dep) is None:
        subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "down"], check=True)
        return
    stop_aggregator(dep, say)
    started = json.loads(dep.started_file.read_text()) if dep.started_file.exists() else []
    if "redis" in started:
        subprocess.run(["redis-cli", "-p", str(dep.redis_host[1]), "shutdown"], capture_output=True)
        say("redis-server stopped (make up had started it)")
    if "rabbitmq" in started:
        subprocess.run(["rabbitmqctl", "stop"], capture_output=True)
        say("rabbitmq-server stopped (make up had started it)")
    dep.started_file.unlink(missing_ok=True)


def status(dep: Deployment) -> dict[str, Any]:
    ahost, aport = dep.amqp_host
    rhost, rport = dep.redis_host
    out: dict[str, Any] = {
        "rabbitmq": {"address": f"{ahost}:{aport}", "up": _reachable(ahost, aport)},
        "management_api": {"address": f"{ahost}:{MANAGEMENT_PORT}", "up": _reachable(ahost, MANAGEMENT_PORT)},
        "redis": {"address": f"{rhost}:{rport}", "up": _reachable(rhost, rport)},
        "aggregator": {"pid": aggregator_pid(dep), "log": str(dep.log_file)},
    }
    out["aggregator"]["up"] = out["aggregator"]["pid"] is not None
    if out["redis"]["up"]:
        from aggregator.store import RoundStore
        from ops.control.rounds import round_summary

        try:
            store = RoundStore.from_url(dep.redis_url)
            out["aggregator"]["config"] = store.config()
            out["devices"] = len(store.device_ids())
            r = store.current_round()
            info = store.info(r) if r is not None else None
            out["round"] = round_summary(info, time.time()) if info is not None else None
            out["counters"] = store.counters()
        except FedMaskError as exc:
            out["redis"]["error"] = str(exc)
    return out
