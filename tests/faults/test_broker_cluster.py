"""A 3-node RabbitMQ cluster on this machine (tests/private_services.py, nodes of the test's own), with
aggregator.uplink a quorum queue replicated on all three: the node holding its leader, and the
aggregator's connection, is stopped mid-round with confirmed updates in the queue; the aggregator
reconnects to another node (the URL lists all three: shared/amqp/settings.py node_urls), the queue
elects a new leader, and the round closes with nothing lost and masks equal to an undisturbed run.

Device queues are classic queues, on the node that declared them (the one the management API runs
on), so the node stopped is another one: docs/deployment.md says how to place them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import pytest

from aggregator.core import AggregatorCore
from aggregator.store import RoundStore
from ops.control.enrolment import Management
from shared.amqp import AGGREGATOR_QUEUE, AmqpSettings, Publisher
from shared.amqp.broker_topology import topology
from shared.data import load_task
from shared.device import FedMaskConfig
from shared.presets import model_spec, preset
from tests.faults.test_crashes import ROUND_TIMEOUT, SEED, TASK, WIDTH, Fleet, Reference, _report, _wait
from tests.private_services import PrivateRabbitMQ, PrivateRedis, rabbitmq_installed
from tests.services import missing

N = 4
pytestmark = [pytest.mark.services, pytest.mark.faults, pytest.mark.exhaustive]  # ~2 min: make faults


def _cluster_url(url: str, nodes: list[PrivateRabbitMQ]) -> str:
    """`url` (one node) with the host part listing `nodes`, in that order."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    hosts = ",".join(f"127.0.0.1:{n.amqp_port}" for n in nodes)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{hosts}"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PrivateRabbitMQ]]:
    if not rabbitmq_installed():
        missing("rabbitmq-server (this suite runs RabbitMQ nodes of its own)")
    tmp = tmp_path_factory.mktemp("cluster")
    nodes = [PrivateRabbitMQ(tmp / f"node{i}", home=tmp / "home") for i in (1, 2, 3)]
    try:
        nodes[0].start()  # first alone: it writes the cookie the others read
        starters = [threading.Thread(target=n.start) for n in nodes[1:]]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        for n in nodes[1:]:
            n.join(nodes[0])
        members = nodes[0].api("GET", "/nodes")
        assert sorted(m["name"] for m in members if m.get("running")) == sorted(n.node for n in nodes)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def fleet(cluster: list[PrivateRabbitMQ], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    n1, _n2, n3 = cluster
    tmp = tmp_path_factory.mktemp("cluster-fleet")
    p = preset(TASK)
    data = load_task(TASK, num_devices=p.devices, seed=SEED, **p.data_options)  # type: ignore[arg-type]
    devices = data.devices[:N]
    ids = [d.device_id for d in devices]
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs)
    vhost = f"fedmask-cluster-{uuid.uuid4().hex[:8]}"
    mgmt = Management(n1.management_url)
    mgmt.ensure_vhost(vhost)
    # Classic queues live on the node that declares them: dead.letters (and, at enrolment, the device
    # queues) are declared through node 1, which stays up. The uplink is declared next through node 3,
    # which the aggregator lists first: the quorum queue's leader, and the aggregator's connection, are there.
    full = topology()
    mgmt._declare(vhost, replace(full, queues=tuple(q for q in full.queues if q.name != AGGREGATOR_QUEUE),
                                 bindings=tuple(b for b in full.bindings if b.queue != AGGREGATOR_QUEUE)))
    admin_url = _cluster_url(n1.amqp_url(vhost), [n3, *cluster[:2]])
    publisher = Publisher(AmqpSettings.from_url(admin_url), declare=True)
    server = PrivateRedis(tmp / "redis")
    server.start()
    store = RoundStore.from_url(server.url())
    creds = {d: _cluster_url(mgmt.enroll(d, vhost=vhost, amqp_port=n1.amqp_port).amqp_url, cluster) for d in ids}
    fl = Fleet(tmp=tmp, admin_url=admin_url, redis=server, ids=ids, creds=creds, slow_device="", spec=spec, cfg=cfg,
               store=store, operator=AggregatorCore(store, publisher, spec, merge="head"))
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
        server.stop()


def _uplink(node: PrivateRabbitMQ, vhost: str) -> dict[str, object]:
    from urllib.parse import quote

    q: dict[str, object] = node.api("GET", f"/queues/{quote(vhost, safe='')}/{AGGREGATOR_QUEUE}")
    return q


@pytest.mark.timeout(400)
def test_the_uplink_leader_node_stops_mid_round(cluster: list[PrivateRabbitMQ], fleet: Fleet) -> None:
    n1, _n2, n3 = cluster
    vhost = AmqpSettings.from_url(fleet.admin_url).vhost
    assert fleet.reference is not None and fleet.aggregator is not None
    uplink = _uplink(n1, vhost)
    assert uplink["type"] == "quorum" and len(uplink["members"]) == 3, uplink  # type: ignore[arg-type]
    assert uplink["leader"] == n3.node, f"the uplink's leader is {uplink['leader']}, expected {n3.node}"
    early, late = fleet.ids[: N // 2], fleet.ids[N // 2:]
    aggregator = fleet.aggregator
    before, dead_before = fleet.store.counters(), fleet.dead_letters()
    fleet.signal_workers(late, signal.SIGSTOP)
    try:
        fleet.start_round(quorum=1.0)
        r = fleet.store.current_round()
        assert r is not None
        _wait(lambda: fleet.info(r).received == sorted(early), ROUND_TIMEOUT, f"{early}'s updates")
        os.kill(aggregator.pid, signal.SIGSTOP)  # the late updates wait in the queue, confirmed
        fleet.signal_workers(late, signal.SIGCONT)
        _wait(lambda: all(fleet.trained(d, r) for d in late), ROUND_TIMEOUT, f"{late} to publish")
        stopped_at = time.monotonic()
        n3.stop()  # the leader's node, and the aggregator's connection, gone
    finally:
        os.kill(aggregator.pid, signal.SIGCONT)
        fleet.signal_workers(late, signal.SIGCONT)
    fleet.wait_closed(r)
    recovered = time.monotonic() - stopped_at
    fleet.wait_masks(r, fleet.ids)
    fleet.reference.play_round(fleet.ids)
    delta = fleet.check_round(r, fleet.ids, before, dead_before)
    assert aggregator.poll() is None, "the aggregator did not survive the node's loss"
    leader = _uplink(n1, vhost)["leader"]
    assert leader in (n1.node, cluster[1].node)
    _report("cluster node stopped", r, delta, f"{len(late)} confirmed updates in the queue when the leader's node "
            f"stopped; new leader {leader}; round closed {recovered:.1f} s later")
