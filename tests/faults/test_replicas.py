"""Several aggregators on one queue (aggregator/store_closer.py): competing consumers, exactly one
closer per round, and a round finished by another replica when its closer dies mid-close or a
replica dies mid-ingest. Masks equal the single-aggregator undisturbed run (`Reference`), bit for bit.

Own RabbitMQ node and redis-server (tests/private_services.py), 4 workers, replicas A, B and C:
- round 1: only A runs, named as a process of another host (so nobody can tell it died) and armed to
  SIGKILL itself while merging; B and C start after it died and wait out its lease, then one of
  them finishes the close;
- round 2: B and C run; B is SIGKILLed with updates stored and more in flight; C finishes the round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress

import pytest

from aggregator.core import FAULT_ENV, AggregatorCore
from aggregator.store import RoundStore
from ops.control.enrolment import Management
from shared.amqp import AmqpSettings, Publisher
from shared.data import load_task
from shared.device import FedMaskConfig
from shared.presets import model_spec, preset
from tests.faults.test_crashes import ROUND_TIMEOUT, SEED, TASK, WIDTH, Fleet, Reference, _report, _tail, _wait
from tests.private_services import PrivateRabbitMQ, PrivateRedis, rabbitmq_installed
from tests.services import missing

N, LEASE_S = 4, 15.0  # the lease outlasts starting two replicas on a loaded 2-core machine
pytestmark = [pytest.mark.services, pytest.mark.faults]


class Replicas:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.procs, self.logs = fleet, {}, {}  # type: ignore[var-annotated]

    def start(self, name: str, *, fault: str | None = None, closer_id: str = "", wait: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if fault:
            env[FAULT_ENV] = fault
        log = self.fleet.tmp / f"replica-{name}.log"
        self.logs[name] = log
        with log.open("a") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "aggregator", "run", "--amqp-url", self.fleet.admin_url,
                 "--redis-url", self.fleet.redis.url(), "--task", TASK, "--width", str(WIDTH), "--merge", "head",
                 "--close-lease", str(LEASE_S), *(["--closer-id", closer_id] if closer_id else [])],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        if wait:
            self.wait_up(name)

    def wait_up(self, name: str) -> None:
        proc, log = self.procs[name], self.logs[name]
        _wait(lambda: proc.poll() is not None or "aggregator up" in log.read_text(), 60, f"replica {name} to start")
        assert proc.poll() is None, f"replica {name} exited {proc.returncode}:\n{_tail(log)}"

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Replicas]]:
    if not rabbitmq_installed():
        missing("rabbitmq-server (this suite runs a RabbitMQ node of its own)")
    tmp = tmp_path_factory.mktemp("replicas")
    p = preset(TASK)
    data = load_task(TASK, num_devices=p.devices, seed=SEED, **p.data_options)  # type: ignore[arg-type]
    devices = data.devices[:N]
    ids = [d.device_id for d in devices]
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    vhost = f"fedmask-replicas-{uuid.uuid4().hex[:8]}"
    with PrivateRabbitMQ(tmp / "rabbitmq") as broker:
        server = PrivateRedis(tmp / "redis")
        server.start()
        mgmt = Management(broker.management_url)
        mgmt.ensure_vhost(vhost)
        admin_url = broker.amqp_url(vhost)
        store = RoundStore.from_url(server.url())
        publisher = Publisher(AmqpSettings.from_url(admin_url), declare=True)
        fl = Fleet(tmp=tmp, admin_url=admin_url, redis=server, ids=ids,
                   creds={d: mgmt.enroll(d, vhost=vhost, amqp_port=broker.amqp_port).amqp_url for d in ids},
                   slow_device="", spec=spec, cfg=cfg, store=store,
                   operator=AggregatorCore(store, publisher, spec, merge="head"))
        replicas = Replicas(fl)
        try:
            replicas.start("A", fault="merging", closer_id="node-a:1")
            for d in ids:
                fl.start_worker(d)
            fl.reference = Reference(server.url(1), spec, cfg, {d.device_id: (d.train.x, d.train.y) for d in devices})
            _wait(lambda: store.device_ids() == sorted(ids), 120, "every worker's hello")
            yield fl, replicas
        finally:
            replicas.stop_all()
            for proc in fl.workers.values():
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
            for proc in fl.workers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            publisher.close()
            server.stop()


@pytest.mark.timeout(300)
def test_a_replica_finishes_the_close_of_a_dead_closer(fleet: tuple[Fleet, Replicas]) -> None:
    fl, replicas = fleet
    assert fl.reference is not None
    before, dead_before = fl.store.counters(), fl.dead_letters()
    fl.start_round(quorum=1.0)
    a = replicas.procs["A"]
    _wait(lambda: a.poll() is not None, ROUND_TIMEOUT, "replica A to die while merging")
    assert a.returncode == -signal.SIGKILL
    assert fl.info(1).state == "closing" and fl.store.closer_of(1) == "node-a:1"
    died_at = time.monotonic()
    replicas.start("B", wait=False)
    replicas.start("C", wait=False)
    replicas.wait_up("B")
    replicas.wait_up("C")
    assert time.monotonic() - died_at < LEASE_S, "the replicas took longer to start than the lease: raise LEASE_S"
    assert fl.info(1).state == "closing", "a replica closed the round while the dead closer's lease held"
    fl.wait_closed(1)
    waited = time.monotonic() - died_at
    fl.wait_masks(1, fl.ids)
    fl.reference.play_round(fl.ids)
    delta = fl.check_round(1, fl.ids, before, dead_before)
    assert delta.get("rounds:taken_over") == 1, delta
    takers = [n for n in ("B", "C") if "taking over the close" in replicas.logs[n].read_text()]
    assert len(takers) == 1, f"exactly one replica should take over, got {takers}"
    assert waited >= LEASE_S - 0.5, "a replica took over before the dead closer's lease lapsed"
    _report("closer died mid-close", 1, delta, f"{takers[0]} took over {waited:.1f} s after A died (lease {LEASE_S} s)")


@pytest.mark.timeout(300)
def test_a_replica_killed_mid_ingest_loses_nothing(fleet: tuple[Fleet, Replicas]) -> None:
    fl, replicas = fleet
    assert fl.reference is not None and fl.reference.rounds == 1
    assert all(replicas.procs[n].poll() is None for n in ("B", "C")), "the replicas of the previous case are gone"
    early, late = fl.ids[: N // 2], fl.ids[N // 2:]
    before, dead_before = fl.store.counters(), fl.dead_letters()
    fl.signal_workers(late, signal.SIGSTOP)
    try:
        fl.start_round(quorum=1.0)
        _wait(lambda: fl.info(2).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates")
        replicas.procs["B"].kill()  # whatever it held unacked goes back to the queue, to C
        replicas.procs["B"].wait(timeout=30)
    finally:
        fl.signal_workers(late, signal.SIGCONT)
    fl.wait_closed(2)
    fl.wait_masks(2, fl.ids)
    fl.reference.play_round(fl.ids)
    delta = fl.check_round(2, fl.ids, before, dead_before)
    assert replicas.procs["C"].poll() is None
    _report("replica killed mid-ingest", 2, delta, "C finished the round alone")
