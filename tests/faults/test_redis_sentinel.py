"""Redis with a replica and Sentinel (aggregator/redis_url.py): the master is SIGKILLed mid-round,
Sentinel promotes the replica, the aggregator follows it (redis+sentinel:// URL) and the round closes
with every acknowledged update there: the store waits for the replica before each ack (?replicas=1).
Servers of the test's own (tests/private_services.py); the broker is the machine's, on a fresh vhost."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore, StoreError
from ops.control.enrolment import Management
from ops.fleet.workers import with_vhost
from shared.amqp import AmqpSettings, Publisher
from shared.data import load_task
from shared.device import FedMaskConfig
from shared.presets import model_spec, preset
from tests.faults.test_crashes import ROUND_TIMEOUT, SEED, TASK, WIDTH, Fleet, Reference, _report, _wait
from tests.private_services import PrivateRedis, free_port, wait_until
from tests.services import missing

N, MASTER = 4, "fedmask"
pytestmark = [pytest.mark.services, pytest.mark.faults, pytest.mark.exhaustive]  # make faults


class Sentinel:
    """One redis-server in Sentinel mode watching `master` (quorum 1: enough to test a failover)."""

    def __init__(self, directory: Path, master: PrivateRedis) -> None:
        self.dir, self.port, self.master = directory, free_port(), master
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:  # what Fleet passes to the aggregator
        return f"redis+sentinel://127.0.0.1:{self.port}/{MASTER}/{db}?replicas=1"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites its own file: a copy of ours
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel", "--logfile", str(self.dir / "log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def knows_master() -> bool:
            try:
                return self.master_port() == self.master.port
            except Exception:
                return False
        wait_until(knows_master, 30, "Sentinel to watch the master")

    def master_port(self) -> int:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            _host, port = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)  # type: ignore[no-untyped-call]
            return int(port)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fleet(amqp_service_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, PrivateRedis,
                                                                                            PrivateRedis]]:
    tmp = tmp_path_factory.mktemp("sentinel")
    # appendfsync everysec, as shipped: the replicas are the guard. Two of them, so that after the
    # failover one is left to confirm updates (?replicas=1) and the round can go on.
    master = PrivateRedis(tmp / "master", appendfsync="everysec")
    replica = PrivateRedis(tmp / "replica", appendfsync="everysec")
    second = PrivateRedis(tmp / "replica2", appendfsync="everysec")
    reference = PrivateRedis(tmp / "reference")
    sentinel = Sentinel(tmp / "sentinel", master)
    vhost = f"fedmask-sentinel-{uuid.uuid4().hex[:8]}"
    mgmt = Management()
    try:
        mgmt.ensure_vhost(vhost)
    except Exception as exc:
        missing(f"RabbitMQ management API ({exc})")
    p = preset(TASK)
    data = load_task(TASK, num_devices=p.devices, seed=SEED, **p.data_options)  # type: ignore[arg-type]
    devices = data.devices[6:6 + N]  # not test_pipeline's first six: device users are broker-wide
    ids = [d.device_id for d in devices]
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    admin_url = with_vhost(amqp_service_url, vhost)
    publisher: Publisher | None = None
    fl: Fleet | None = None
    try:
        master.start()
        for r in (replica, second):
            r.extra = ("--replicaof", "127.0.0.1", str(master.port))
            r.start()
            wait_until(lambda r=r: r.client().info("replication").get("master_link_status") == "up", 30,  # type: ignore[misc]
                       "a replica to sync")
        reference.start()
        sentinel.start()
        store = RoundStore.from_url(sentinel.url())
        publisher = Publisher(AmqpSettings.from_url(admin_url), declare=True)
        fl = Fleet(tmp=tmp, admin_url=admin_url, redis=sentinel, ids=ids,  # type: ignore[arg-type]
                   creds={d: mgmt.enroll(d, vhost=vhost).amqp_url for d in ids}, slow_device="", spec=spec,
                   cfg=cfg, store=store, operator=AggregatorCore(store, publisher, spec, merge="head"))
        fl.start_aggregator()
        for d in ids:
            fl.start_worker(d)
        fl.reference = Reference(reference.url(), spec, cfg, {d.device_id: (d.train.x, d.train.y) for d in devices})
        _wait(lambda: store.device_ids() == sorted(ids), 120, "every worker's hello")
        yield fl, master, replica
    finally:
        procs = ([fl.aggregator] if fl is not None and fl.aggregator is not None else []) + \
            (list(fl.workers.values()) if fl is not None else [])
        for proc in procs:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
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
        for server in (sentinel, master, replica, second, reference):
            server.stop()


@pytest.mark.timeout(300)
def test_master_killed_mid_round_fails_over_with_no_acked_update_lost(
        fleet: tuple[Fleet, PrivateRedis, PrivateRedis]) -> None:
    fl, master, _replica = fleet
    assert fl.reference is not None and fl.aggregator is not None
    early, late = fl.ids[: N // 2], fl.ids[N // 2:]
    before, dead_before = fl.store.counters(), fl.dead_letters()
    fl.signal_workers(late, signal.SIGSTOP)
    try:
        fl.start_round(quorum=1.0)
        r = fl.store.current_round()
        assert r is not None
        _wait(lambda: fl.info(r).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates")
        killed_at = time.monotonic()
        master.kill()  # SIGKILL: whatever the master alone held is gone; acked updates were on the replica
        fl.signal_workers(late, signal.SIGCONT)
    finally:
        fl.signal_workers(late, signal.SIGCONT)
    sentinel: Sentinel = fl.redis  # type: ignore[assignment]
    _wait(lambda: sentinel.master_port() != master.port, 60, "Sentinel to promote a replica")
    promoted = time.monotonic() - killed_at

    def closed() -> bool:
        try:
            return fl.info(r).state == "closed"
        except StoreError as err:  # this test's own client may meet the failover too
            assert err.retryable, err
            return False
    _wait(closed, ROUND_TIMEOUT, f"round {r} to close")
    fl.wait_masks(r, fl.ids)
    fl.reference.play_round(fl.ids)
    delta = fl.check_round(r, fl.ids, before, dead_before)
    assert fl.aggregator.poll() is None, "the aggregator did not survive the failover"
    _report("redis master SIGKILLed", r, delta, f"replica promoted {promoted:.1f} s later; {len(early)} acked "
            "updates survived on it; the same aggregator finished the round")
