"""Crashes and restarts on the real pipeline: one aggregator and N worker processes over RabbitMQ and Redis.

Each case drives the fleet's next round under one fault, then checks that the round closed with no
update lost and none counted twice, and that every merged mask (in Redis, and as each device applied
it) equals the undisturbed run of the same seed, bit for bit. The undisturbed run is `Reference`: the
same AggregatorCore and DeviceRuntime code in this process, with an in-memory downlink, playing the
same rounds with the same participants.

Isolation and cost. One fleet serves the module, because starting worker processes (torch import,
pruning) is most of the cost: a RabbitMQ node and a redis-server of its own (tests/private_services.py:
the cases stop and restart them, and the machine's services serve other work), one aggregator, N
workers. The cases run the fleet's rounds in turn and any one can run alone; a case that leaves the
fleet unusable makes the later ones skip, so read the first failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.core import FAULT_ENV, AggregatorCore
from aggregator.store import RoundInfo, RoundStore
from ops.control.enrolment import Management
from shared import codec
from shared.amqp import DEAD_QUEUE, AmqpSettings, Publisher, queue_depth
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.models import ModelSpec
from shared.presets import model_spec, preset
from shared.transport import InMemoryTransport
from tests.private_services import PrivateRabbitMQ, PrivateRedis, rabbitmq_installed
from tests.services import missing

TASK, WIDTH, SEED, N = "digits", 32, 0, 4
ROUND_TIMEOUT = 90.0  # a round here takes seconds; the slack is for a loaded 2-core machine
# Longer than the uplink consumer's patience with a failing handler (5 attempts 1 s apart, then the
# delivery is dead-lettered), so an update that arrives during the outage would be lost to it.
REDIS_DOWN_SECONDS = 7.0
pytestmark = [pytest.mark.services, pytest.mark.faults]


# ------------------------------------------------------------------------------------------ helpers


def _wait(cond: Callable[[], bool], timeout: float, what: str, *, every: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


# ---------------------------------------------------------------------------------- the undisturbed run


class Reference:
    """The same rounds without faults: AggregatorCore over Redis (its own db) and an in-memory
    downlink, and the devices' DeviceRuntime in this process. Every device trains on every task, as
    every worker does; only the participants' updates arrive in time, the others' arrive late."""

    def __init__(self, redis_url: str, spec: ModelSpec, cfg: FedMaskConfig,
                 train_data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.store = RoundStore.from_url(redis_url, prefix="ref:")
        self.bus = InMemoryTransport()
        self.core = AggregatorCore(self.store, self.bus, spec, merge="head")
        self.devices = {d: DeviceRuntime(d, spec, cfg, xy, SEED) for d, xy in train_data.items()}
        for d, dev in self.devices.items():  # prunes, as each worker does at its first start
            assert self.core.handle(f"device.{d}.hello", d, codec.encode(dev.hello())).action == "ack"
        self.rounds = 0

    def play_round(self, participants: list[str]) -> None:
        info = self.core.start_round(rate=1.0, quorum=len(participants) / len(self.devices), deadline_s=600,
                                     seed=SEED)
        updates = {}
        for d, dev in self.devices.items():
            for body in self.bus.take_downlink(d):
                updates[d] = codec.encode(dev.handle_task(codec.decode(body, expect_type="task")))
        assert sorted(updates) == sorted(self.devices)
        for d in participants:
            assert self.core.handle(f"device.{d}.update", d, updates[d]).action == "ack"
        for d in sorted(set(updates) - set(participants)):
            assert self.core.handle(f"device.{d}.update", d, updates[d]).reason == "round_closed"
        assert self.store.info(info.round_id).state == "closed"  # type: ignore[union-attr]
        for d, dev in self.devices.items():
            for body in self.bus.take_downlink(d):
                dev.handle_mask(codec.decode(body, expect_type="mask"))
        self.rounds = info.round_id


# --------------------------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    tmp: Path
    admin_url: str  # the test vhost, as the guest administrator
    redis: PrivateRedis
    ids: list[str]
    creds: dict[str, str]  # device -> its own AMQP URL (enrolled user)
    slow_device: str  # runs the pi4 profile: the window to kill it mid-training is 5x wider
    spec: ModelSpec
    cfg: FedMaskConfig
    store: RoundStore  # the aggregator's keys
    operator: AggregatorCore  # opens rounds as `fedmask round start` does
    reference: Reference | None = None
    aggregator: subprocess.Popen[bytes] | None = None
    aggregator_logs: list[Path] = field(default_factory=list)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- processes

    def start_aggregator(self, fault: str | None = None, *, wait_up: bool = True) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if fault is not None:
            env[FAULT_ENV] = fault
        log = self.tmp / f"aggregator-{len(self.aggregator_logs) + 1}{'-' + fault if fault else ''}.log"
        self.aggregator_logs.append(log)
        with log.open("w") as out:  # the child keeps its own descriptor
            self.aggregator = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "aggregator", "run", "--amqp-url", self.admin_url,
                 "--redis-url", self.redis.url(), "--task", TASK, "--width", str(WIDTH), "--merge", "head"],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = self.aggregator
        if wait_up:
            _wait(lambda: proc.poll() is not None or "aggregator up" in log.read_text(), 60, "the aggregator to start")
            assert proc.poll() is None, f"the aggregator exited {proc.returncode}:\n{_tail(log)}"
        return proc

    def stop_aggregator(self) -> None:
        if self.aggregator is not None and self.aggregator.poll() is None:
            self.aggregator.terminate()  # SIGTERM drains: nothing unpersisted is acked
            try:
                self.aggregator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.aggregator.kill()
                self.aggregator.wait()

    def aggregator_log(self) -> str:
        return self.aggregator_logs[-1].read_text(errors="replace")

    def start_worker(self, device: str) -> None:
        profile = "pi4" if device == self.slow_device else "jetson"
        with (self.tmp / f"{device}.log").open("a") as out:  # "a": a restarted worker's log follows the first
            self.workers[device] = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "worker", "--device-id", device, "--task", TASK, "--width",
                 str(WIDTH), "--profile", profile, "--amqp-url", self.creds[device],
                 "--state-dir", str(self.state_dir)],
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)

    def worker_log(self, device: str) -> str:
        return (self.tmp / f"{device}.log").read_text(errors="replace")

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def signal_workers(self, devices: list[str], sig: signal.Signals) -> None:
        for d in devices:
            with suppress(ProcessLookupError):
                os.kill(self.workers[d].pid, sig)

    # -- what the devices did (worker/runtime.py appends one JSON line per message it handles)

    def records(self, device: str, kind: str) -> list[dict[str, Any]]:
        path = self.state_dir / f"{device}.stats.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        return [row for row in rows if row["type"] == kind]

    def trained(self, device: str, round_id: int) -> bool:
        """True once the device's update for the round was confirmed by the broker (the record follows
        publish_uplink, which returns on the publisher confirm)."""
        return any(row["round"] == round_id for row in self.records(device, "update"))

    def masks_received(self, device: str, round_id: int) -> int:
        """How many mask messages of this round's version the device handled (a repeat is ignored)."""
        return sum(row["version"] == round_id for row in self.records(device, "mask"))

    def _saved_device(self, device: str) -> DeviceRuntime:
        dev = DeviceRuntime(device, self.spec, self.cfg, (np.zeros(0), np.zeros(0)), SEED)
        dev.load(self.state_dir / f"{device}.npz")
        return dev

    def device_mask_bits(self, device: str) -> np.ndarray:
        return self._saved_device(device).model.mask_bits()

    def device_structure(self, device: str) -> bytes:
        structure = self._saved_device(device).structure
        assert structure is not None
        return structure.tobytes()

    # -- rounds

    def start_round(self, quorum: float = 1.0) -> RoundInfo:
        info = self.operator.start_round(rate=1.0, quorum=quorum, deadline_s=120, seed=SEED)
        assert info.sampled == sorted(self.ids)
        return info

    def info(self, round_id: int) -> RoundInfo:
        info = self.store.info(round_id)
        assert info is not None, f"round {round_id} does not exist"
        return info

    def wait_closed(self, round_id: int) -> None:
        _wait(lambda: self.info(round_id).state == "closed", ROUND_TIMEOUT, f"round {round_id} to close")

    def wait_masks(self, round_id: int, devices: list[str]) -> None:
        _wait(lambda: all(self.masks_received(d, round_id) for d in devices), ROUND_TIMEOUT,
              f"{devices} to apply the merged masks of round {round_id}")

    def dead_letters(self) -> int:
        return queue_depth(AmqpSettings.from_url(self.admin_url), DEAD_QUEUE)

    @contextmanager
    def case(self) -> Iterator[int]:
        """Run one case on a usable fleet: yields the round the case drives."""
        try:
            current = self.store.current_round() or 0
            problems = [] if current == 0 or self.info(current).state == "closed" else [f"round {current} unclosed"]
        except Exception as exc:  # Redis gone: an earlier case could not bring it back
            current, problems = -1, [f"redis: {exc}"]
        if self.aggregator is None or self.aggregator.poll() is not None:
            problems.append("the aggregator is not running")
        problems += [f"worker {d} exited" for d, p in self.workers.items() if p.poll() is not None]
        if self.reference is None or self.reference.rounds != current:
            problems.append("the reference run is out of step")
        if problems:
            pytest.skip(f"the fleet is unusable after an earlier case: {'; '.join(problems)}")
        yield current + 1

    def check_round(self, round_id: int, participants: list[str], before: dict[str, int], dead_before: int, *,
                    late: int = 0, uncounted: int = 0) -> dict[str, int]:
        """The fleet's round `round_id` against the reference's: nothing lost, nothing counted twice,
        every merged mask equal. `uncounted`: updates stored by an aggregator killed before it counted
        them (the counter is a separate write after the store; the received set is the authority).
        Returns the counter deltas (for the case's own checks and report)."""
        assert self.reference is not None and self.reference.rounds == round_id
        info = self.info(round_id)
        counters = self.store.counters()
        delta = {k: counters.get(k, 0) - before.get(k, 0) for k in sorted(set(counters) | set(before))}
        delta = {k: v for k, v in delta.items() if v}
        assert info.state == "closed"
        assert info.received == sorted(participants), "an update was lost (or a non-participant's was stored)"
        assert delta.get("updates:stored", 0) == len(participants) - uncounted, f"updates:stored is off: {delta}"
        assert delta.get("rounds:closed", 0) == 1, f"the round was closed more or less than once: {delta}"
        assert delta.get("late:dropped", 0) == late, delta
        assert self.dead_letters() - dead_before == late, "an update was dead-lettered"
        ref = self.reference
        for d in self.ids:
            assert self.store.mask(d) == ref.store.mask(d), f"{d}: merged mask in Redis != undisturbed run"
            assert np.array_equal(self.device_mask_bits(d), ref.devices[d].model.mask_bits()), \
                f"{d}: the device's mask != undisturbed run"
        return delta


def _report(case: str, round_id: int, delta: dict[str, int], extra: str = "") -> None:
    """One line per case (shown with -s or -rA): what was stored, recognised as duplicate, dropped."""
    print(f"\n[{case}] round {round_id}: stored {delta.get('updates:stored', 0)}, duplicates "
          f"{delta.get('updates:duplicate', 0)}, late dropped {delta.get('late:dropped', 0)}, masks equal; {extra}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of the suite's own: the RabbitMQ case stops it, and the machine's broker serves
    other work."""
    if not rabbitmq_installed():
        missing("rabbitmq-server (the fault suite runs a RabbitMQ node of its own)")
    with PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node


@pytest.fixture(scope="module")
def fleet(broker: PrivateRabbitMQ, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if shutil.which("redis-server") is None:
        missing("redis-server (the fault suite runs its own, with AOF on)")
    tmp = tmp_path_factory.mktemp("faults")
    vhost = f"fedmask-faults-{uuid.uuid4().hex[:8]}"
    mgmt = Management(broker.management_url)
    try:
        mgmt.ensure_vhost(vhost)
    except Exception as exc:  # the management API is the enrolment path: under CI it must be there
        missing(f"RabbitMQ management API ({exc})")
    server = PrivateRedis(tmp / "redis")
    p = preset(TASK)
    data = load_task(TASK, num_devices=p.devices, seed=SEED, **p.data_options)  # type: ignore[arg-type]  # as the worker
    devices = data.devices[-N:]
    ids = [d.device_id for d in devices]
    admin_url = broker.amqp_url(vhost)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    store = RoundStore.from_url(server.url())  # connects on first use
    publisher: Publisher | None = None
    fl: Fleet | None = None
    try:
        server.start()
        creds = {d: mgmt.enroll(d, vhost=vhost, amqp_port=broker.amqp_port).amqp_url for d in ids}
        publisher = Publisher(AmqpSettings.from_url(admin_url), declare=True)
        fl = Fleet(tmp=tmp, admin_url=admin_url, redis=server, ids=ids, creds=creds, slow_device=ids[-1], spec=spec,
                   cfg=FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs), store=store,
                   operator=AggregatorCore(store, publisher, spec, merge="head"))
        fl.start_aggregator()
        for d in ids:
            fl.start_worker(d)
        # Pruning the reference devices here overlaps with the workers' start-up.
        fl.reference = Reference(server.url(1), spec, fl.cfg, {d.device_id: (d.train.x, d.train.y) for d in devices})
        _wait(lambda: store.device_ids() == sorted(ids), 120, "every worker's hello")
        for d in ids:  # pruning is deterministic: each worker pruned as the reference did
            assert store.structure(d) == fl.reference.devices[d].structure.tobytes(), d  # type: ignore[union-attr]
        yield fl
    finally:
        procs = ([fl.aggregator] if fl is not None and fl.aggregator is not None else []) + \
            (list(fl.workers.values()) if fl is not None else [])
        for proc in procs:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a case that failed may have left it stopped
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if publisher is not None:
            publisher.close()
        for d in ids:
            mgmt.delete_device(d, vhost=vhost)
        mgmt.delete_vhost(vhost)
        server.stop()


# ------------------------------------------------------------------------------------------------ cases

CRASH_POINTS = [
    # the update completing the quorum
    pytest.param(f"consumed:{N}", id="after-consuming-before-storing", marks=pytest.mark.exhaustive),
    pytest.param("stored:2", id="after-storing-before-acking"),
    pytest.param("merging", id="during-merging"),
    pytest.param("published:2", id="after-publishing-some-masks", marks=pytest.mark.exhaustive),
    pytest.param("published_all", id="after-publishing-all-before-marking-closed", marks=pytest.mark.exhaustive),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", CRASH_POINTS)
def test_aggregator_killed_then_restarted(fleet: Fleet, fault: str) -> None:
    point = fault.split(":")[0]
    with fleet.case() as r:
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.stop_aggregator()
        doomed = fleet.start_aggregator(fault, wait_up=False)
        fleet.start_round(quorum=1.0)
        _wait(lambda: doomed.poll() is not None, ROUND_TIMEOUT, f"the aggregator to reach {fault}")
        assert doomed.returncode == -signal.SIGKILL, \
            f"the aggregator exited {doomed.returncode} before reaching {fault}:\n{_tail(fleet.aggregator_logs[-1])}"

        # What the kill left behind shows it struck at that exact point: round state, updates stored,
        # and whether the merged masks had all reached Redis.
        info = fleet.info(r)
        all_masks_stored = all(fleet.store.mask_version(d) == r for d in fleet.ids)
        # The aggregator ingests in batches (aggregator/core_batch.py): "consumed" strikes before the
        # batch holding the quorum-completing update is stored, so fewer than N are; "stored" strikes
        # once the batch holding the second update is stored (with whatever else it held), before any
        # ack. How the workers' updates fall into batches depends on their timing, hence the ranges.
        received = len(info.received)
        if point == "consumed":
            assert (info.state, all_masks_stored) == ("open", False) and received < N, (info.state, received)
        elif point == "stored":
            assert received >= 2 and not all_masks_stored and info.state == ("open" if received < N else "closing")
        else:
            left = {"merging": ("closing", N, False), "published": ("closing", N, False),
                    "published_all": ("closing", N, True)}[point]
            assert (info.state, received, all_masks_stored) == left

        fleet.start_aggregator()  # a clean one: resumes a 'closing' round, gets the unacked delivery again
        fleet.wait_closed(r)
        # A resumed close publishes every mask again; a device that had one already ignores the repeat.
        # The masks go out over several connections (shared.amqp.PublisherPool), so killed at the second
        # confirm, at least 2 devices (any of them, and maybe more: those in flight) got theirs twice.
        sent_before_kill = {"published": 2, "published_all": N}.get(point, 0)

        def masks_as_expected() -> bool:
            got = [fleet.masks_received(d, r) for d in fleet.ids]
            return set(got) <= {1, 2} and got.count(2) >= sent_before_kill and (point == "published" or
                                                                              got.count(2) == sent_before_kill)
        _wait(masks_as_expected, ROUND_TIMEOUT, f"every device to get its mask, {sent_before_kill} of them twice")
        expected = [fleet.masks_received(d, r) for d in fleet.ids]
        assert fleet.reference is not None
        fleet.reference.play_round(fleet.ids)
        # Counting is part of the batch's store (admit_update.lua mode ingest): nothing stored is uncounted.
        delta = fleet.check_round(r, fleet.ids, before, dead_before)

        if point == "stored":  # the update in hand was stored but not acked: redelivered, found duplicate
            assert delta.get("updates:duplicate", 0) >= 1, delta
        # From "merging" on, the quorum-completing update's ack went out before the close began
        # (aggregator/service.py close_elected), or was still on its way: redelivered or not, never lost.
        if point in ("merging", "published", "published_all"):
            assert f"resuming the close of round {r}" in fleet.aggregator_log()
        _report(fault, r, delta, f"mask messages per device {expected}")


@pytest.mark.timeout(300)
def test_worker_killed_mid_training(fleet: Fleet) -> None:
    victim = fleet.slow_device
    others = [d for d in fleet.ids if d != victim]
    with fleet.case() as r:
        assert fleet.reference is not None
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        structure = fleet.store.structure(victim)
        fleet.start_round(quorum=(N - 1) / N)  # closes on the others' updates
        # The task record is written as training starts; the update record once the update is published.
        _wait(lambda: bool([x for x in fleet.records(victim, "task") if x["round"] == r]), 30,
              f"{victim} to start training", every=0.005)
        fleet.workers[victim].send_signal(signal.SIGKILL)
        fleet.workers[victim].wait(timeout=10)
        assert not fleet.trained(victim, r), "the kill came too late: the victim had finished training"

        fleet.wait_closed(r)
        assert fleet.info(r).received == sorted(others)
        fleet.wait_masks(r, others)
        fleet.start_worker(victim)  # same state dir: resumes, and trains the redelivered (now late) task
        _wait(lambda: fleet.trained(victim, r), ROUND_TIMEOUT, f"the restarted {victim} to train round {r}")
        _wait(lambda: fleet.store.counters().get("late:dropped", 0) > before.get("late:dropped", 0), 30,
              f"the aggregator to receive {victim}'s late update")
        log = fleet.worker_log(victim)
        assert log.count("pruned once") == 1 and log.count("resumed from") == 1, "the restart pruned again"
        assert fleet.store.structure(victim) == structure == fleet.device_structure(victim)
        fleet.reference.play_round(others)  # the victim trains too; its update arrives late
        delta = fleet.check_round(r, others, before, dead_before, late=1)
        assert fleet.masks_received(victim, r) == 0
        _report("worker killed", r, delta, f"{victim} killed mid-training, resumed without pruning")

        # The next round: the restarted worker takes part again.
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.start_round(quorum=1.0)
        fleet.wait_closed(r + 1)
        fleet.wait_masks(r + 1, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r + 1, fleet.ids, before, dead_before)
        _report("worker killed, next round", r + 1, delta, f"{victim} took part")


@contextmanager
def _broker_stopped(broker: PrivateRabbitMQ) -> Iterator[None]:
    """The suite's RabbitMQ application stopped (its Erlang node keeps running), and started again on
    the way out, also when the case fails."""
    broker.stop_app()
    try:
        yield
    finally:
        broker.start_app()


@pytest.mark.timeout(400)
def test_rabbitmq_restarted_mid_round(fleet: Fleet, broker: PrivateRabbitMQ) -> None:
    early, late = fleet.ids[: N // 2], fleet.ids[N // 2:]
    with fleet.case() as r:
        assert fleet.reference is not None and fleet.aggregator is not None
        aggregator = fleet.aggregator
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.signal_workers(late, signal.SIGSTOP)  # they hold their tasks until we let them go
        try:
            fleet.start_round(quorum=1.0)
            _wait(lambda: fleet.info(r).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates")
            # The late updates are published, and confirmed, while the aggregator cannot take them: the
            # broker alone holds them across the restart.
            os.kill(aggregator.pid, signal.SIGSTOP)
            fleet.signal_workers(late, signal.SIGCONT)
            _wait(lambda: all(fleet.trained(d, r) for d in late), ROUND_TIMEOUT, f"{late} to publish")
            assert fleet.info(r).received == sorted(early)
            logs_before = {d: len(fleet.worker_log(d)) for d in fleet.ids}
            aggregator_log_before = len(fleet.aggregator_log())
            with _broker_stopped(broker):
                os.kill(aggregator.pid, signal.SIGCONT)  # it lives through the outage and reconnects on its own
                time.sleep(2)  # long enough for a refused reconnect or two
        finally:
            os.kill(aggregator.pid, signal.SIGCONT)
            fleet.signal_workers(late, signal.SIGCONT)
        fleet.wait_closed(r)
        fleet.wait_masks(r, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r, fleet.ids, before, dead_before)
        assert fleet.aggregator is aggregator and aggregator.poll() is None, "the aggregator did not survive"
        outage = fleet.aggregator_log()[aggregator_log_before:]
        refused = outage.count("connect (consumer:aggregator.uplink) failed")
        assert refused >= 1, "the aggregator never tried to reconnect while the broker was down"
        reconnected = [d for d in fleet.ids if "reconnecting in" in fleet.worker_log(d)[logs_before[d]:]]
        assert reconnected == fleet.ids, f"only {reconnected} reconnected"
        _report("rabbitmq restart", r, delta, f"{len(late)} confirmed updates held by the broker alone across the "
                f"restart; the aggregator's reconnects refused while it was down: {refused}")


@pytest.mark.timeout(300)
def test_redis_restarted_mid_round(fleet: Fleet) -> None:
    early, late = fleet.ids[: N // 2], fleet.ids[N // 2:]
    with fleet.case() as r:
        assert fleet.reference is not None and fleet.aggregator is not None
        aggregator = fleet.aggregator
        before, dead_before = fleet.store.counters(), fleet.dead_letters()
        fleet.signal_workers(late, signal.SIGSTOP)
        try:
            fleet.start_round(quorum=1.0)
            _wait(lambda: fleet.info(r).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates")
            down_at = time.monotonic()
            fleet.redis.shutdown()
            fleet.signal_workers(late, signal.SIGCONT)  # their updates reach the aggregator while Redis is down
            _wait(lambda: all(fleet.trained(d, r) for d in late), ROUND_TIMEOUT, f"{late} to publish")
            time.sleep(max(0.0, REDIS_DOWN_SECONDS - (time.monotonic() - down_at)))
            assert aggregator.poll() is None, \
                f"the aggregator died while Redis was down:\n{_tail(fleet.aggregator_logs[-1])}"
        finally:
            fleet.signal_workers(late, signal.SIGCONT)
            if fleet.redis.proc is None or fleet.redis.proc.poll() is not None:
                fleet.redis.start()  # same dir: the AOF brings the round back
        fleet.wait_closed(r)
        fleet.wait_masks(r, fleet.ids)
        fleet.reference.play_round(fleet.ids)
        delta = fleet.check_round(r, fleet.ids, before, dead_before)
        assert fleet.aggregator is aggregator and aggregator.poll() is None, "the aggregator did not survive"
        waits = [line for line in fleet.aggregator_log().splitlines() if "retrying in" in line and "redis " in line]
        assert waits, "the aggregator never met the outage"
        _report("redis restart", r, delta, f"Redis down {REDIS_DOWN_SECONDS:.0f} s, {len(waits)} retries logged; "
                "the same aggregator finished the round")
