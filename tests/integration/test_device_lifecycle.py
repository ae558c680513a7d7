"""A board's life against the real broker and Redis: its queue disappears mid-round (the round still
closes, its mask waits in Redis and reaches it when it says hello again), an operator removes it
(never sampled again, its updates resolved and counted, its messages refused) or rotates its
password (the old one refused at once)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner

from aggregator.core import AggregatorCore
from aggregator.round_stats import round_stats
from aggregator.store import RoundStore
from ops.cli import main
from ops.control.devices import readmit_removed, remove_device
from ops.control.enrolment import Management, ManagementError
from shared import codec
from shared.amqp import AmqpError, AmqpSettings, Publisher, device_queue, queue_depth
from shared.bits import pack, select_at
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from tests.integration.test_amqp import drain, wait_until
from tests.services import missing

TASK, WIDTH, SEED, N = "digits", 32, 0, 3
pytestmark = pytest.mark.services


@dataclass
class Board:
    device: DeviceRuntime
    url: str  # its own broker user

    @property
    def id(self) -> str:
        return self.device.device_id


@dataclass
class Deployment:
    vhost: str
    mgmt: Management
    admin: AmqpSettings
    store: RoundStore
    core: AggregatorCore
    boards: dict[str, Board]
    amqp_host: str
    amqp_port: int

    def hello(self, board: Board) -> None:
        decision = self.core.handle(f"device.{board.id}.hello", board.id, codec.encode(board.device.hello()))
        assert decision.action == "ack", decision

    def tasks(self, ids: list[str]) -> dict[str, codec.Message]:
        return {d: codec.decode(drain(self.admin, device_queue(d), 1)[0].body, expect_type="task") for d in ids}

    def delete_queue(self, device_id: str) -> None:
        self.mgmt._request("DELETE", f"/queues/{quote(self.vhost, safe='')}/{quote(device_queue(device_id), safe='')}")

    def enroll(self, device_id: str) -> str:
        return self.mgmt.enroll(device_id, vhost=self.vhost, amqp_host=self.amqp_host,
                                amqp_port=self.amqp_port).amqp_url


@pytest.fixture()
def deployment(amqp_service_url: str, store: RoundStore) -> Iterator[Deployment]:
    u = urlsplit(amqp_service_url)
    mgmt = Management(f"http://{u.hostname}:15672")
    vhost = f"fedmask-lifecycle-{uuid.uuid4().hex[:8]}"
    try:
        mgmt.ensure_vhost(vhost)
    except ManagementError as exc:
        missing(f"RabbitMQ management API ({exc})")
    data = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=1)
    tag = uuid.uuid4().hex[:6]
    boards = {}
    admin = AmqpSettings.from_url(f"{u.scheme}://{u.netloc}/{quote(vhost, safe='')}")
    publisher = Publisher(admin, declare=True)
    try:
        for i, part in enumerate(data.devices[:N]):
            dev = DeviceRuntime(f"lc{tag}-{i}", spec, cfg, (part.train.x, part.train.y), SEED)
            url = mgmt.enroll(dev.device_id, vhost=vhost, amqp_host=u.hostname or "", amqp_port=u.port or 5672).amqp_url
            boards[dev.device_id] = Board(dev, url)
        dep = Deployment(vhost, mgmt, admin, store, AggregatorCore(store, publisher, spec, merge="head"), boards,
                         u.hostname or "", u.port or 5672)
        for b in boards.values():
            dep.hello(b)
        yield dep
    finally:
        publisher.close()
        for d in boards:
            mgmt.delete_device(d, vhost=vhost)
        mgmt.delete_vhost(vhost)


def _play(dep: Deployment, ids: list[str]) -> dict[str, bytes]:
    """Each sampled board's update for the current round, trained on its task."""
    return {d: codec.encode(dep.boards[d].device.handle_task(t)) for d, t in dep.tasks(ids).items()}


@pytest.mark.timeout(180)
def test_a_board_whose_queue_is_gone_never_blocks_a_round(deployment: Deployment) -> None:
    dep, store = deployment, deployment.store
    ids = sorted(dep.boards)
    gone = ids[-1]
    info = dep.core.start_round(rate=1.0, quorum=1.0, deadline_s=120, seed=SEED)
    updates = _play(dep, ids)
    dep.delete_queue(gone)  # the board is reset mid-round: its queue is gone, its update is on its way
    for d, body in updates.items():
        assert dep.core.handle(f"device.{d}.update", d, body).action == "ack"
    after = store.info(info.round_id)
    assert after is not None and after.state == "closed", "the round did not close"
    assert store.unreachable() == {gone} and store.counters()["devices:unreachable"] == 1
    stored = store.mask(gone)
    assert stored is not None and stored[1] == info.round_id, "the unreachable board's mask was not kept"
    for d in ids[:-1]:  # the others got theirs
        [mask] = drain(dep.admin, device_queue(d), 1)
        assert codec.decode(mask.body, expect_type="mask").version == info.round_id

    nxt = dep.core.start_round(rate=1.0, quorum=1.0, deadline_s=120, seed=SEED)
    assert gone not in nxt.sampled and sorted(nxt.sampled) == ids[:-1], "an unreachable board was sampled"

    dep.enroll(gone)  # the board is set up again: queue back, and its worker says hello on start
    dep.hello(dep.boards[gone])
    assert store.unreachable() == set() and store.counters()["downlink:resent"] == 1
    [resent] = drain(dep.admin, device_queue(gone), 1)
    msg = codec.decode(resent.body, expect_type="mask")
    rec = dep.core._record(gone)
    assert rec is not None
    expected = select_at(np.frombuffer(stored[0], np.uint8), rec.where(dep.core.nbits), dep.core.nbits)
    assert msg.version == info.round_id and msg.bits == expected.tobytes()
    dep.boards[gone].device.handle_mask(msg)
    assert pack(dep.boards[gone].device.model.mask_bits()).tobytes() == stored[0]


@pytest.mark.timeout(180)
def test_a_removed_board_is_gone_for_good(deployment: Deployment) -> None:
    dep, store = deployment, deployment.store
    ids = sorted(dep.boards)
    victim, others = ids[0], ids[1:]
    info = dep.core.start_round(rate=1.0, quorum=1.0, deadline_s=120, seed=SEED)
    updates = _play(dep, ids)
    assert dep.core.handle(f"device.{victim}.update", victim, updates[victim]).action == "ack"
    store.set_pending(victim, info.round_id - 1 or 1, updates[victim])  # as if a late update were parked too
    old_url = dep.boards[victim].url

    removal = remove_device(victim, mgmt=dep.mgmt, store=store, vhost=dep.vhost)
    assert (removal.was_enrolled, removal.stored_dropped, removal.parked_dropped) == (True, 1, 1)
    counters = store.counters()
    assert (counters["removed:stored"], counters["removed:parked"], counters["devices:removed"]) == (1, 1, 1)
    assert victim not in store.device_ids() and victim not in store.pending_devices()
    assert victim not in round_stats(store, info.round_id), "its training statistics still count in the round"
    with pytest.raises(AmqpError) as refused:
        Publisher(AmqpSettings.from_url(old_url))
    assert refused.value.code == 403
    with pytest.raises(AmqpError):
        queue_depth(dep.admin, device_queue(victim))  # its queue is deleted

    # Its update still in flight, and a hello from it, are refused with a reason.
    again = dep.core.handle(f"device.{victim}.update", victim, updates[victim])
    assert (again.action, again.reason) == ("reject", "device_removed")
    hello = dep.core.handle(f"device.{victim}.hello", victim, codec.encode(dep.boards[victim].device.hello()))
    assert (hello.action, hello.reason) == ("reject", "device_removed")

    for d in others:
        assert dep.core.handle(f"device.{d}.update", d, updates[d]).action == "ack"
    still = store.info(info.round_id)
    assert still is not None and still.received == others  # quorum 3 no longer met: it closes on its deadline
    assert victim not in store.device_ids(), "a removed board would be sampled again"

    # A new enrolment brings the id back.
    dep.enroll(victim)
    assert readmit_removed([victim], store) == [victim]
    assert dep.core.handle(f"device.{victim}.hello", victim,
                           codec.encode(dep.boards[victim].device.hello())).action == "ack"


@pytest.mark.timeout(120)
def test_rotate_refuses_the_old_password_at_once(deployment: Deployment) -> None:
    dep = deployment
    board = sorted(dep.boards)[1]
    old_url = dep.boards[board].url
    live = Publisher(AmqpSettings.from_url(old_url))
    live.publish_uplink(board, "hello", b"before")
    api = f"http://{dep.amqp_host}:15672"
    user = AmqpSettings.from_url(old_url).username
    # The management API lists a new connection only after its next stats refresh (a few seconds).
    assert wait_until(lambda: any(c["user"] == user for c in dep.mgmt.list_connections()), 30)
    out = CliRunner().invoke(main, ["devices", "rotate", board, "--vhost", dep.vhost, "--api-url", api,
                                    "--amqp-port", str(dep.amqp_port)])
    assert out.exit_code == 0, out.output
    new_url = out.output.strip().split("\t")[1]
    assert new_url != old_url
    with pytest.raises(AmqpError) as refused:
        Publisher(AmqpSettings.from_url(old_url))
    assert refused.value.code == 403
    with pytest.raises(AmqpError):  # the connection opened with the old password was closed too
        live.publish_uplink(board, "hello", b"x")
        live.publish_uplink(board, "hello", b"x")  # the first may retry on a fresh connection: refused
    live.close()
    with Publisher(AmqpSettings.from_url(new_url)) as pub:
        pub.publish_uplink(board, "hello", b"new password works")

    unknown = CliRunner().invoke(main, ["devices", "rotate", "never-enrolled", "--vhost", dep.vhost, "--api-url", api])
    assert unknown.exit_code == 1 and "not enrolled" in unknown.output
    # Redis unreachable: a clear error, and the board is left enrolled (nothing half-removed).
    failed = CliRunner().invoke(main, ["devices", "remove", board, "--vhost", dep.vhost, "--api-url", api,
                                       "--redis-url", "redis://127.0.0.1:1/0"])
    assert failed.exit_code == 1 and "redis" in failed.output.lower(), failed.output
    assert dep.mgmt.is_enrolled(board, vhost=dep.vhost)
