"""A fleet on services of its own (a RabbitMQ node, a redis-server), for the fault suites of issue 11:
tests/faults/test_worker_outbox.py and tests/faults/test_redis_kill.py. The Fleet and the undisturbed
Reference are test_crashes.py's; this adds fault points for workers, an aggregator that can be paused
at a fault point, and the Redis options of broker_config/redis.conf."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from aggregator.core import FAULT_ACTION_ENV, AggregatorCore
from aggregator.store import RoundStore
from ops.control.enrolment import Management
from shared.amqp import AmqpSettings, Publisher
from shared.data import load_task
from shared.device import FedMaskConfig
from shared.presets import model_spec, preset
from tests.faults.test_crashes import SEED, TASK, WIDTH, Fleet, Reference, _tail, _wait
from tests.private_services import PrivateRabbitMQ, PrivateRedis, rabbitmq_installed
from tests.services import missing
from worker.runtime import WORKER_FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
N = 4


def shipped_redis_options() -> dict[str, str]:
    """The durability options of broker_config/redis.conf, as redis-server flags want them."""
    wanted = ("appendonly", "appendfsync", "aof-use-rdb-preamble", "save")
    found: dict[str, str] = {}
    for line in (ROOT / "broker_config" / "redis.conf").read_text().splitlines():
        words = line.split("#", 1)[0].split(None, 1)
        if len(words) == 2 and words[0] in wanted:
            found[words[0]] = words[1].strip()
    assert set(found) == set(wanted), f"broker_config/redis.conf lacks {set(wanted) - set(found)}"
    return found


@dataclass
class FaultFleet(Fleet):
    def start_worker(self, device: str, fault: str | None = None) -> None:  # type: ignore[override]
        env = {k: v for k, v in os.environ.items() if k != WORKER_FAULT_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if fault is not None:
            env[WORKER_FAULT_ENV] = fault
        with (self.tmp / f"{device}.log").open("a") as out:  # a restarted worker's log follows the first
            self.workers[device] = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "worker", "--device-id", device, "--task", TASK, "--width",
                 str(WIDTH), "--profile", "jetson", "--amqp-url", self.creds[device],
                 "--state-dir", str(self.state_dir)],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def start_paused_aggregator(self, fault: str) -> subprocess.Popen[bytes]:
        """An aggregator that SIGSTOPs itself at `fault` (FEDMASK_FAULT_ACTION=stop)."""
        os.environ[FAULT_ACTION_ENV] = "stop"  # start_aggregator copies the environment
        try:
            return self.start_aggregator(fault)
        finally:
            del os.environ[FAULT_ACTION_ENV]


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    """True once the process is stopped (SIGSTOP): state T in /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


@contextmanager
def own_fleet(tmp: Path, *, redis_options: dict[str, str] | None = None) -> Iterator[FaultFleet]:
    """A RabbitMQ node, a redis-server (with `redis_options` as flags), an aggregator and N workers."""
    if not rabbitmq_installed():
        missing("rabbitmq-server (this suite runs a RabbitMQ node of its own)")
    p = preset(TASK)
    data = load_task(TASK, num_devices=p.devices, seed=SEED, **p.data_options)  # type: ignore[arg-type]
    devices = data.devices[:N]
    ids = [d.device_id for d in devices]
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    vhost = f"fedmask-own-{uuid.uuid4().hex[:8]}"
    options = dict(redis_options or {})
    fsync = options.pop("appendfsync", "always")
    extra = tuple(x for k, v in options.items() for x in (f"--{k}", v))
    with PrivateRabbitMQ(tmp / "rabbitmq") as broker:
        server = PrivateRedis(tmp / "redis", appendfsync=fsync, extra=extra)
        server.start()
        mgmt = Management(broker.management_url)
        mgmt.ensure_vhost(vhost)
        admin_url = broker.amqp_url(vhost)
        store = RoundStore.from_url(server.url())
        publisher = Publisher(AmqpSettings.from_url(admin_url), declare=True)
        fl = FaultFleet(tmp=tmp, admin_url=admin_url, redis=server, ids=ids,
                        creds={d: mgmt.enroll(d, vhost=vhost, amqp_port=broker.amqp_port).amqp_url for d in ids},
                        slow_device="", spec=spec, cfg=cfg, store=store,
                        operator=AggregatorCore(store, publisher, spec, merge="head"))
        try:
            fl.start_aggregator()
            for d in ids:
                fl.start_worker(d)
            fl.reference = Reference(server.url(1), spec, cfg, {d.device_id: (d.train.x, d.train.y) for d in devices})
            _wait(lambda: store.device_ids() == sorted(ids), 120, "every worker's hello")
            yield fl
        finally:
            procs = ([fl.aggregator] if fl.aggregator is not None else []) + list(fl.workers.values())
            for proc in procs:
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            publisher.close()
            store.close()
            server.stop()


__all__ = ["FaultFleet", "N", "_tail", "_wait", "own_fleet", "shipped_redis_options", "stopped"]
