"""A fleet of real worker processes on one machine, for the demo and the decoupling benchmark.

Everything runs through the real product: the aggregator is the background service `make up`
starts, devices are enrolled through the management API with their own broker users, and each
worker is a separate `fedmask worker` process. A fleet owns its own vhost, Redis database and run
directory, which it resets on start, so it never touches a production deployment's state.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from aggregator.core import AggregatorCore
from aggregator.store import RoundInfo, RoundStore
from ops.control.enrolment import Management
from ops.control.rounds import RoundPlan, RunLog, run_rounds
from ops.services.aggregator_process import start_aggregator, stop_aggregator
from ops.services.deployment import Deployment
from ops.services.local_servers import ensure_rabbitmq, ensure_redis
from shared.amqp import AmqpSettings, Publisher
from shared.errors import FedMaskError
from shared.presets import model_spec


def with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + vhost))


def fleet_profiles(ids: list[str], workers: int, pi4: int) -> dict[str, str]:
    """The first `workers` device ids, the first `pi4` of them emulating a Pi 4, the rest a Jetson."""
    if not 0 <= pi4 <= workers <= len(ids):
        raise FedMaskError(f"need 0 <= pi4 ({pi4}) <= workers ({workers}) <= devices with data ({len(ids)})")
    return {d: ("pi4" if i < pi4 else "jetson") for i, d in enumerate(ids[:workers])}


def _stats_records(state_dir: Path, device: str) -> list[dict[str, Any]]:
    """What the worker logged in its state dir, one record per task, update and mask."""
    path = state_dir / f"{device}.stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def worker_stats(state_dir: Path, device: str) -> dict[str, Any]:
    """Bytes both ways, and the board's turnaround per task: task received -> update sent."""
    up = down = 0
    board_s: list[float] = []
    tasked: dict[int, float] = {}
    for rec in _stats_records(state_dir, device):
        up += rec.get("bytes_up", 0)
        down += rec.get("bytes_down", 0)
        if rec["type"] == "task":
            tasked[rec["round"]] = rec["t"]
        elif rec["type"] == "update":
            board_s.append(rec["t"] - tasked.get(rec["round"], rec["t"] - rec["board_s"]))
    return {"bytes_up": up, "bytes_down": down, "updates": len(board_s),
            "median_turnaround_s": statistics.median(board_s) if board_s else None}


def saved_mask_version(state_dir: Path, device: str) -> int:
    """The newest mask version the worker has persisted (0: none yet)."""
    return max((rec.get("version", 0) for rec in _stats_records(state_dir, device)), default=0)


@dataclass
class FleetSpec:
    task: str
    devices: dict[str, str]  # device id -> profile (pi4 | jetson)
    amqp_url: str  # admin URL; the fleet uses its own vhost on that broker
    redis_url: str  # a Redis database the fleet may reset
    run_dir: Path
    vhost: str = "fedmask-demo"
    width: int | None = None
    seed: int = 0
    merge: str = "head"
    api_url: str = "http://127.0.0.1:15672"
    metrics_port: int | None = None  # the aggregator's /metrics port (None: its default)
    strategy: str | None = None  # a weight-training strategy instead of FedMask (aggregator and workers)
    planned_rounds: int | None = None
    mode: str = "rounds"  # the aggregator's --mode (async: it tasks every board itself, no rounds)
    buffer: int = 3
    max_staleness: int = 10
    staleness: str = "constant"


@dataclass
class Fleet:
    spec: FleetSpec
    say: Any = print
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[str]] = field(default_factory=list)

    @property
    def deployment(self) -> Deployment:
        s = self.spec
        return Deployment(amqp_url=with_vhost(s.amqp_url, s.vhost), redis_url=s.redis_url,
                          run_dir=s.run_dir / "services", task=s.task, width=s.width, seed=s.seed, merge=s.merge,
                          metrics_port=s.metrics_port, strategy=s.strategy, planned_rounds=s.planned_rounds,
                          mode=s.mode, buffer=s.buffer, max_staleness=s.max_staleness, staleness=s.staleness)

    @property
    def state_dir(self) -> Path:
        return self.spec.run_dir / "state"

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, hello_timeout_s: float = 300.0) -> None:
        s, dep = self.spec, self.deployment
        for folder in (dep.run_dir, self.state_dir, s.run_dir / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        ensure_rabbitmq(dep, self.say)
        ensure_redis(dep, self.say)
        u = urlsplit(s.amqp_url)
        mgmt = Management(s.api_url, u.username or "guest", u.password or "guest")
        self._reset(mgmt)
        start_aggregator(dep, self.say)
        host, port = dep.amqp_host  # the broker the fleet was given, not the enrolment default 127.0.0.1:5672
        creds = {d: mgmt.enroll(d, vhost=s.vhost, amqp_host=host, amqp_port=port).amqp_url for d in s.devices}
        self.say(f"enrolled {len(creds)} devices (own broker user each) in vhost {s.vhost}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for d, profile in s.devices.items():
            log = (s.run_dir / "logs" / f"{d}.log").open("w")
            self.logs.append(log)
            cmd = [sys.executable, "-m", "ops.cli", "worker", "--device-id", d, "--profile", profile, "--task",
                   s.task, "--amqp-url", creds[d], "--state-dir", str(self.state_dir), "--seed", str(s.seed)]
            if s.width is not None:
                cmd += ["--width", str(s.width)]
            if s.strategy is not None:
                cmd += ["--strategy", s.strategy]
            self.procs[d] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.say(f"started {len(self.procs)} workers; waiting for every hello (each prunes once) ...")
        self._wait_hellos(hello_timeout_s)

    def _reset(self, mgmt: Management) -> None:
        """A clean slate: this fleet's Redis keys, vhost and worker state (never anyone else's)."""
        self.check_redis_is_scratch()
        store = RoundStore.from_url(self.spec.redis_url)
        for key in store.client.scan_iter(match=b"fm:*"):
            store.client.delete(key)
        mgmt.delete_vhost(self.spec.vhost)
        mgmt.ensure_vhost(self.spec.vhost)
        for f in self.state_dir.glob("*"):
            f.unlink()

    def check_redis_is_scratch(self) -> None:
        if urlsplit(self.spec.redis_url).path in ("", "/", "/0"):
            raise FedMaskError("a fleet resets its Redis database: give it one other than db 0 "
                               f"(got {self.spec.redis_url.rsplit('@', 1)[-1]})")

    def _wait_hellos(self, timeout_s: float) -> None:
        store = RoundStore.from_url(self.spec.redis_url)
        end = time.time() + timeout_s
        while time.time() < end:
            self.check_alive()
            if set(store.device_ids()) >= set(self.spec.devices):
                return
            time.sleep(0.5)
        missing = sorted(set(self.spec.devices) - set(store.device_ids()))
        raise FedMaskError(f"no hello from {', '.join(missing)} within {timeout_s:.0f}s; see {self.spec.run_dir}/logs")

    def run_rounds(self, rounds: int, plan: RoundPlan, on_round: Callable[[RoundInfo], None] | None = None,
                   budget_s: float | None = None) -> RunLog:
        """Drive `rounds` rounds (or as many as open within `budget_s`) through this fleet's aggregator;
        fail fast if a worker dies."""
        s = self.spec
        store = RoundStore.from_url(s.redis_url)
        with Publisher(AmqpSettings.from_url(self.deployment.amqp_url)) as pub:
            core = AggregatorCore(store, pub, model_spec(s.task, width=s.width, seed=s.seed), merge=s.merge) \
                if s.strategy is None else self._strategy_core(store, pub)
            return run_rounds(core, store, rounds, plan, on_round=on_round, on_poll=lambda _i: self.check_alive(),
                              budget_s=budget_s)

    def _strategy_core(self, store: RoundStore, pub: Publisher) -> AggregatorCore:
        from aggregator.core_strategy_rounds import StrategyRoundsCore
        from shared.strategy_setup import strategy_setup

        s = self.spec
        assert s.strategy is not None
        setup = strategy_setup(s.task, s.strategy, width=s.width, seed=s.seed, rounds=s.planned_rounds)
        return StrategyRoundsCore(store, pub, setup, seed=s.seed)

    def wait_outstanding(self, timeout_s: float) -> None:
        """Let slow boards finish the task they hold, so a report counts the work they did (their late
        update is handled by the policy like any other; no new round will merge it)."""
        store = RoundStore.from_url(self.spec.redis_url)
        ids = list(self.spec.devices)
        last = store.current_round() or 0
        end = time.time() + timeout_s
        busy = store.busy(ids, last + 1, max_staleness=last + 1)
        if busy:
            self.say(f"waiting for {len(busy)} boards still training: {', '.join(sorted(busy))} ...")
        while busy and time.time() < end:
            self.check_alive()
            time.sleep(0.5)
            busy = store.busy(ids, last + 1, max_staleness=last + 1)

    def wait_last_masks(self, timeout_s: float = 30.0) -> None:
        """The last round's participants persist the mask they were sent before the fleet stops."""
        store = RoundStore.from_url(self.spec.redis_url)
        end = time.time() + timeout_s
        while time.time() < end:
            self.check_alive()
            pending = [d for d in self.spec.devices if saved_mask_version(self.state_dir, d) < store.mask_version(d)]
            if not pending:
                return
            time.sleep(0.3)

    def check_alive(self) -> None:
        dead = {d: p.returncode for d, p in self.procs.items() if p.poll() is not None}
        if dead:
            d, code = next(iter(dead.items()))
            tail = (self.spec.run_dir / "logs" / f"{d}.log").read_text().splitlines()[-8:]
            raise FedMaskError(f"worker {d} exited with code {code}:\n" + "\n".join(tail))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()
        stop_aggregator(self.deployment, self.say)
