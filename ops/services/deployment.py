"""Where one machine's services are (URLs, run dir) and whether they answer."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import FedMaskError

ROOT = Path(__file__).resolve().parents[2]  # the repository: broker_config/, ops/deploy/, the aggregator's cwd
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MANAGEMENT_PORT = 15672


def default_run_dir() -> Path:
    """One place per user for the services' pid, log and local Redis data, whatever the working folder:
    $XDG_STATE_HOME/fedmask/services, else ~/.local/state/fedmask/services (FEDMASK_RUN_DIR overrides)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedmask" / "services"


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, seconds: float, what: str) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if reachable(host, port):
            return
        time.sleep(0.5)
    raise FedMaskError(f"{what} did not come up on {host}:{port} within {seconds:.0f}s")


@dataclass(frozen=True)
class Deployment:
    amqp_url: str
    redis_url: str
    run_dir: Path
    task: str = "activity"
    width: int | None = None
    seed: int = 0
    merge: str = "head"
    metrics_port: int | None = None  # the aggregator's --metrics-port (None: its default)
    strategy: str | None = None  # the aggregator's --strategy (None: FedMask with `merge`)
    planned_rounds: int | None = None  # with `strategy`: its --planned-rounds
    mode: str = "rounds"  # the aggregator's --mode; with "async" also the three settings below
    buffer: int = 3
    max_staleness: int = 10
    staleness: str = "constant"

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
