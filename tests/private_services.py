"""RabbitMQ and Redis servers of a test's own, for cases that stop, kill, restart or reconfigure them.

The broker and Redis on a developer's machine serve other work: `make test` must never stop, restart
or reconfigure them. A case that needs to do any of that starts its own server here, on free loopback
ports, with its data in the test's tmp folder, and removes it afterwards (also when the case fails).

PrivateRabbitMQ runs the installed RabbitMQ release as a second Erlang node: its own node name, AMQP,
distribution and management ports, data and log folders, Erlang cookie (a HOME of its own) and
configuration file. It skips the distribution's wrapper (/usr/sbin/rabbitmq-server), which switches
to the `rabbitmq` user and its HOME, and with it to the machine node's cookie, and it ignores
/etc/rabbitmq/rabbitmq-env.conf, which pins the machine node's name. A fresh node takes about 15 s to
start on this machine, so a suite starts one per module, not per case.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the release's own scripts, behind the distribution wrapper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (bound together, so none of them is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(cond: Callable[[], bool], timeout: float, what: str, *, every: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rabbitmq_installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and (RABBITMQ_BIN / "rabbitmqctl").exists()


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own. `config` lines are appended to the node's rabbitmq.conf
    (the listeners are always ours); `definitions` is a definitions file to import at boot."""

    def __init__(self, directory: Path, *, config: str = "", definitions: Path | None = None,
                 home: Path | None = None) -> None:
        """home: the HOME (and so the Erlang cookie) to use; nodes of one cluster must share it."""
        self.dir = directory
        self.home = home or directory / "home"
        self.node = f"fmtest-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port, self.management_port, self.dist_port = _free_ports(3)
        self.config, self.definitions = config, definitions
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses

    def amqp_url(self, vhost: str = "", user: str = "guest", password: str = "guest") -> str:
        from urllib.parse import quote

        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    # -- lifecycle

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),  # its own .erlang.cookie: the machine node's CLI cannot reach it
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # /etc/rabbitmq/rabbitmq-env.conf names the machine node
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _write_config(self) -> None:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {self.management_port}",
        ]
        if self.definitions is not None:
            lines += ["definitions.import_backend = local_filesystem", f"definitions.local.path = {self.definitions}"]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n" + self.config + "\n")
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def start(self, timeout: float = 120) -> None:
        """Start the node (again, with the same data, after `stop` or `kill`) and wait until both AMQP
        and the management API answer."""
        self._write_config()
        with (self.dir / "server.out").open("ab") as out:
            self.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self._env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc
        wait_until(lambda: proc.poll() is not None or self.answers(), timeout, f"RabbitMQ node {self.node}", every=0.5)
        if proc.poll() is not None:
            raise AssertionError(f"RabbitMQ node {self.node} exited {proc.returncode}: {self.log_tail()}")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1):
                pass
            self.api("GET", "/overview")
            return True
        except OSError:
            return False

    def api(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            f"{self.management_url}/api{path}", method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode(),
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self._env(),
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stderr or done.stdout}")
        return done.stdout

    def stop_app(self) -> None:
        """The RabbitMQ application stopped; the Erlang node keeps running (`start_app` brings it back)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app", timeout=300)
        self.ctl("await_startup", timeout=300)
        wait_until(self.answers, 120, f"RabbitMQ node {self.node} to answer again", every=0.5)

    def join(self, seed: PrivateRabbitMQ) -> None:
        """Join `seed`'s cluster (both must share `home`): this node's own data is reset."""
        self.ctl("stop_app")
        self.ctl("reset")
        self.ctl("join_cluster", seed.node, timeout=180)
        self.start_app()

    def kill(self) -> None:
        """SIGKILL the whole node (beam and its helpers): a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the node cleanly, or kill it if it does not go; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60)
            self.proc.wait(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            self.kill()
        with suppress(ProcessLookupError):  # epmd-launched helpers left in the session
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        logs = [*sorted((self.dir / "log").glob("*.log")), self.dir / "server.out"]
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PrivateRabbitMQ:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the test's own. Defaults to the shipped deployment's durability
    (broker_config/redis.conf: AOF on, appendfsync as given) so a kill tests what users run."""

    def __init__(self, directory: Path, *, appendfsync: str = "always", extra: tuple[str, ...] = ()) -> None:
        self.dir, self.port = directory, free_port()
        self.appendfsync, self.extra = appendfsync, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--logfile", str(self.dir / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = self.client()
        try:
            wait_until(lambda: _redis_answers(client), 30, "redis-server to answer", every=0.1)
        finally:
            client.close()

    def shutdown(self) -> None:
        """SHUTDOWN (Redis fsyncs the AOF on the way out), then wait for the process to end."""
        client = self.client()
        with suppress(redis.ConnectionError):  # the server drops the connection as it exits
            client.shutdown()
        client.close()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: a crash. Whatever the AOF had not fsynced is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
