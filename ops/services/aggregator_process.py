"""The aggregator as a background process of this machine: a pid file and a log file in the run dir."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ops.services.deployment import ROOT, Deployment
from ops.services.local_servers import REDIS, started_here
from shared.errors import FedMaskError


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
           dep.redis_url, "--task", dep.task, "--seed", str(dep.seed)]
    cmd += ["--merge", dep.merge] if dep.strategy is None else ["--strategy", dep.strategy]
    if dep.strategy is not None and dep.planned_rounds is not None:
        cmd += ["--planned-rounds", str(dep.planned_rounds)]
    if dep.mode == "async":
        cmd += ["--mode", "async", "--buffer", str(dep.buffer), "--max-staleness", str(dep.max_staleness),
                "--staleness", dep.staleness]
    if dep.width is not None:
        cmd += ["--width", str(dep.width)]
    if REDIS.name not in started_here(dep):
        # A Redis that was already running is not ours to configure: its appendfsync decides whether a
        # crash of it loses acked updates; the aggregator's log says which (aggregator/store_durability.py).
        cmd += ["--ack-durability", "unchecked"]
    if dep.metrics_port is not None:
        cmd += ["--metrics-port", str(dep.metrics_port)]
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
