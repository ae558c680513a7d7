"""shared/amqp/ and ops/control/enrolment.py against a real RabbitMQ.

Isolation: each test gets a unique namespace (a prefix on every exchange and queue name) on the
fixture's vhost and deletes its topology afterwards, so only AMQP access is needed. Enrolment tests
also need the management API (users and permissions are broker-wide): they work in a throwaway vhost
with uniquely named devices and delete both. Without the management API they skip locally and fail
under CI=true, like every other missing service.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from ops.control.enrolment import DeviceCredentials, Management, ManagementError
from shared.amqp import (
    AGGREGATOR_QUEUE,
    DEAD_QUEUE,
    REASON_HEADER,
    AmqpError,
    AmqpSettings,
    Consumer,
    Delivery,
    Outcome,
    Publisher,
    declare_topology,
    delete_topology,
    device_queue,
    open_channel,
    queue_depth,
    topology,
)
from shared.errors import ConfigError
from shared.transport import DeviceUnreachable
from tests.services import missing

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("dev-1", "dev-2")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Collector:
    """A handler that records deliveries and answers with `decide` (ack by default)."""

    def __init__(self, decide: Callable[[Delivery], Outcome] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.decide = decide or (lambda d: Outcome.ack())
        self.lock = threading.Lock()

    def __call__(self, d: Delivery) -> Outcome:
        with self.lock:
            self.deliveries.append(d)
        return self.decide(d)

    def bodies(self) -> list[bytes]:
        with self.lock:
            return [d.body for d in self.deliveries]


@contextmanager
def consuming(settings: AmqpSettings, queue: str, handler: Callable[[Delivery], Outcome],
              **kw: object) -> Iterator[Consumer]:
    c = Consumer(settings, queue, handler, **kw)  # type: ignore[arg-type]
    c.start_in_thread()
    try:
        assert c.wait_ready(10), "consumer did not start"
        yield c
    finally:
        c.stop()


def drain(settings: AmqpSettings, queue: str, n: int, timeout: float = 10.0) -> list[Delivery]:
    """Consume (and ack) exactly n messages from queue."""
    got = Collector()
    with consuming(settings, queue, got):
        assert wait_until(lambda: len(got.deliveries) >= n, timeout), f"{queue}: {len(got.deliveries)} of {n}"
        time.sleep(0.2)  # anything beyond n would arrive now
    assert len(got.deliveries) == n, got.bodies()
    return got.deliveries


@pytest.fixture
def settings(amqp_service_url: str) -> Iterator[AmqpSettings]:
    s = AmqpSettings.from_url(amqp_service_url, namespace=f"test-{uuid.uuid4().hex[:10]}.")
    with Publisher(s, declare=True), open_channel(s) as ch:
        declare_topology(ch, namespace=s.namespace, device_ids=DEVICES)
    yield s
    delete_topology(s, device_ids=DEVICES)


def q(settings: AmqpSettings, name: str) -> str:
    return settings.namespace + name


# ------------------------------------------------------------------------------------------ no broker


def test_settings_redact_validate_and_parse() -> None:
    s = AmqpSettings.from_url("amqp://dev%2Dx:s3cr%40t@broker:5672/fedmask", heartbeat=10)
    assert s.redacted() == "amqp://dev%2Dx:***@broker:5672/fedmask"
    assert "s3cr" not in s.redacted()
    assert (s.username, s.vhost, s.heartbeat, s.prefetch) == ("dev-x", "fedmask", 10, 16)
    assert AmqpSettings.from_url("amqp://guest:guest@h:5672/").vhost == "/"
    with pytest.raises(ConfigError) as e:
        AmqpSettings.from_url("http://u:topsecret@h/")
    assert "topsecret" not in str(e.value)
    with pytest.raises(ConfigError):
        AmqpSettings(prefetch=0)
    with pytest.raises(AmqpError):
        device_queue("a.b")  # a dot would split the routing key
    assert device_queue("pi-4_1", "ns.") == "ns.device.pi-4_1"
    with pytest.raises(ValueError):
        Outcome.reject("")


def test_definitions_json_matches_the_declared_topology() -> None:
    defs = json.loads((ROOT / "broker_config" / "definitions.json").read_text())
    topo = topology()
    assert {(e["name"], e["type"], e["durable"]) for e in defs["exchanges"]} == \
        {(e.name, e.type, True) for e in topo.exchanges}
    assert {(x["name"], json.dumps(x["arguments"], sort_keys=True), x["durable"]) for x in defs["queues"]} == \
        {(x.name, json.dumps(dict(x.arguments), sort_keys=True), True) for x in topo.queues}
    assert {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]} == \
        {(b.exchange, b.queue, b.routing_key) for b in topo.bindings}
    assert {x["vhost"] for x in defs["exchanges"] + defs["queues"] + defs["bindings"]} == {"fedmask"}


# ------------------------------------------------------------------------------------------ topology, publish, consume


def test_topology_declare_is_idempotent(settings: AmqpSettings) -> None:
    with Publisher(settings, declare=True), open_channel(settings) as ch:  # second and third time
        declare_topology(ch, namespace=settings.namespace, device_ids=("dev-1",))
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0


def test_uplink_is_confirmed_and_consumed_with_user_id_and_routing_key(settings: AmqpSettings) -> None:
    with Publisher(settings) as pub:
        for i in range(3):
            pub.publish_uplink("dev-1", "update", b"u%d" % i)
        pub.publish_uplink("dev-2", "hello", b"h")
    # confirmed means enqueued: the count is exact without waiting
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 4
    got = drain(settings, q(settings, AGGREGATOR_QUEUE), 4)
    assert [d.body for d in got] == [b"u0", b"u1", b"u2", b"h"]
    assert [d.routing_key for d in got] == ["device.dev-1.update"] * 3 + ["device.dev-2.hello"]
    assert {d.user_id for d in got} == {settings.username}
    assert not any(d.redelivered for d in got)
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0


def test_downlink_reaches_only_the_device_queue_and_unroutable_raises(settings: AmqpSettings) -> None:
    with Publisher(settings) as pub:
        pub.publish_downlink("dev-1", b"task", headers={"round": 7})
        with pytest.raises(DeviceUnreachable) as e:
            pub.publish_downlink("not-enrolled", b"lost")
        assert e.value.device_id == "not-enrolled" and "unroutable" in str(e.value)
        assert isinstance(e.value.__cause__, AmqpError) and e.value.__cause__.code == 312
        pub.publish_downlink("dev-1", b"still works after a returned message")
    assert queue_depth(settings, q(settings, device_queue("dev-2"))) == 0
    got = drain(settings, q(settings, device_queue("dev-1")), 2)
    assert got[0].body == b"task" and got[0].headers == {"round": 7} and got[0].routing_key == "dev-1"


def test_reject_lands_in_dead_letters_once_with_reason_and_leaves_the_queue(settings: AmqpSettings) -> None:
    def decide(d: Delivery) -> Outcome:
        return Outcome.reject("bad_crc") if d.body == b"poison" else Outcome.ack()

    with Publisher(settings) as pub:
        for body in (b"ok-1", b"poison", b"ok-2"):
            pub.publish_uplink("dev-1", "update", body)
    handler = Collector(decide)
    with consuming(settings, q(settings, AGGREGATOR_QUEUE), handler):
        assert wait_until(lambda: len(handler.deliveries) == 3)
    assert handler.bodies() == [b"ok-1", b"poison", b"ok-2"]
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    [dead] = drain(settings, q(settings, DEAD_QUEUE), 1)
    assert dead.body == b"poison"
    assert dead.headers[REASON_HEADER] == "bad_crc"
    assert dead.headers["x-original-routing-key"] == "device.dev-1.update"
    assert dead.headers["x-original-user-id"] == settings.username
    assert dead.headers["x-original-queue"] == q(settings, AGGREGATOR_QUEUE)


def test_reject_on_a_device_queue_dead_letters_natively(settings: AmqpSettings) -> None:
    # A device may not write to fedmask.dead, so its consumer nacks and the queue's DLX moves the message.
    with Publisher(settings) as pub:
        pub.publish_downlink("dev-2", b"task for another model")
    handler = Collector(lambda d: Outcome.reject("layout_mismatch"))
    with consuming(settings, q(settings, device_queue("dev-2")), handler, prefetch=1) as c:
        assert c.dead_letter == "native"
        assert wait_until(lambda: len(handler.deliveries) == 1)
    assert queue_depth(settings, q(settings, device_queue("dev-2"))) == 0
    [dead] = drain(settings, q(settings, DEAD_QUEUE), 1)
    assert dead.body == b"task for another model"
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == q(settings, device_queue("dev-2"))


def test_handler_exception_is_retried_then_dead_lettered(settings: AmqpSettings) -> None:
    calls: list[bool] = []

    def boom(d: Delivery) -> Outcome:
        calls.append(d.redelivered)
        raise RuntimeError("bug in handler")

    with Publisher(settings) as pub:
        pub.publish_uplink("dev-1", "update", b"crashes the handler")
    with consuming(settings, q(settings, AGGREGATOR_QUEUE), boom, max_attempts=3, requeue_delay=0.05):
        assert wait_until(lambda: queue_depth(settings, q(settings, DEAD_QUEUE)) == 1)
    assert calls == [False, True, True]
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    [dead] = drain(settings, q(settings, DEAD_QUEUE), 1)
    assert dead.headers[REASON_HEADER] == "handler_error"


def test_requeue_outcome_redelivers(settings: AmqpSettings) -> None:
    handler = Collector(lambda d: Outcome.ack() if d.redelivered else Outcome.requeue())
    with Publisher(settings) as pub:
        pub.publish_uplink("dev-1", "update", b"try again")
    with consuming(settings, q(settings, AGGREGATOR_QUEUE), handler, requeue_delay=0.05):
        assert wait_until(lambda: len(handler.deliveries) == 2)
        time.sleep(0.2)
    assert [d.redelivered for d in handler.deliveries] == [False, True]
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    assert queue_depth(settings, q(settings, DEAD_QUEUE)) == 0


def test_long_handler_does_not_starve_heartbeats(settings: AmqpSettings) -> None:
    s = AmqpSettings.from_url(settings.url, namespace=settings.namespace, heartbeat=2)
    def train(d: Delivery) -> Outcome:
        time.sleep(6)  # 3 heartbeat intervals: the broker gives up after 2 missed ones
        return Outcome.ack()

    handler = Collector(train)
    with Publisher(s) as pub:
        pub.publish_uplink("dev-1", "update", b"slow")
    with consuming(s, q(s, AGGREGATOR_QUEUE), handler, prefetch=1) as c:
        assert wait_until(lambda: len(handler.deliveries) == 1)
        assert wait_until(lambda: not c._busy.is_set(), timeout=10)
        time.sleep(0.3)  # let the ack's commit land
        assert c.connections == 1, "the connection dropped while the handler ran"
    assert len(handler.deliveries) == 1 and not handler.deliveries[0].redelivered
    assert queue_depth(s, q(s, AGGREGATOR_QUEUE)) == 0


def test_stop_settles_the_delivery_in_hand_and_returns_the_rest(settings: AmqpSettings) -> None:
    started = threading.Event()

    def slow(d: Delivery) -> Outcome:
        started.set()
        time.sleep(1.0)
        return Outcome.ack()

    handler = Collector(slow)
    with Publisher(settings) as pub:
        for i in range(5):
            pub.publish_uplink("dev-1", "update", b"m%d" % i)
    c = Consumer(settings, q(settings, AGGREGATOR_QUEUE), handler, prefetch=5)
    c.start_in_thread()
    assert started.wait(10)
    c.stop()
    assert handler.bodies() == [b"m0"]
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 4  # m0 acked, m1..m4 back in the queue


def test_missing_confirm_times_out(settings: AmqpSettings) -> None:
    s = AmqpSettings.from_url(settings.url, namespace=settings.namespace, confirm_timeout=1e-4)
    with Publisher(s) as pub, pytest.raises(AmqpError, match="no publisher confirm"):
        pub.publish_uplink("dev-1", "update", bytes(8 * 1024 * 1024))  # cannot be confirmed in 0.1 ms
    with Publisher(settings) as pub:  # and nothing is left broken
        pub.publish_uplink("dev-1", "update", b"fine")


def test_refused_consumers_fail_fast(settings: AmqpSettings) -> None:
    with pytest.raises(AmqpError) as e, consuming(settings, q(settings, "no.such.queue"), Collector()):
        pass
    assert e.value.code == 404 and not e.value.retryable
    u = urlsplit(settings.url)
    wrong = AmqpSettings.from_url(f"amqp://{u.username}:wrong-password@{u.hostname}:{u.port}{u.path}")
    with pytest.raises(AmqpError) as e:
        Publisher(wrong)
    assert e.value.code == 403 and "wrong-password" not in str(e.value)


# ------------------------------------------------------------------------------------------ management API


@pytest.fixture(scope="module")
def management(amqp_service_url: str) -> Management:
    u = urlsplit(amqp_service_url)
    api = os.environ.get("FEDMASK_TEST_MANAGEMENT_URL", f"http://{u.hostname}:15672")
    m = Management(api, unquote(u.username or "guest"), unquote(u.password or "guest"))
    try:
        m.list_users()
    except ManagementError as e:
        missing(f"RabbitMQ management API ({e})")
    return m


def kill_connection(management: Management, connection_name: str) -> None:
    def find() -> list[str]:
        return [c["name"] for c in management.list_connections() if c["connection_name"] == connection_name]

    assert wait_until(lambda: bool(find()), timeout=15), f"no connection named {connection_name}"
    for name in find():
        management.close_connection(name)


def test_consumer_reconnects_and_never_acks_a_tag_from_the_dead_connection(
        settings: AmqpSettings, management: Management) -> None:
    release = threading.Event()

    def hold_first(d: Delivery) -> Outcome:
        if not d.redelivered:
            release.wait(20)
        return Outcome.ack()

    handler = Collector(hold_first)
    with Publisher(settings) as pub:
        pub.publish_uplink("dev-1", "update", b"held across a reconnect")
    with consuming(settings, q(settings, AGGREGATOR_QUEUE), handler, prefetch=1) as c:
        assert wait_until(lambda: len(handler.deliveries) == 1)
        kill_connection(management, f"fedmask:consumer:{q(settings, AGGREGATOR_QUEUE)}")
        assert wait_until(lambda: c.connections == 2, timeout=10)
        release.set()  # the first handler returns now: its ack belongs to the dead connection
        assert wait_until(lambda: len(handler.deliveries) == 2)
        time.sleep(0.3)
    first, second = handler.deliveries
    assert (first.body, second.body) == (b"held across a reconnect",) * 2 and second.redelivered
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 0
    assert queue_depth(settings, q(settings, DEAD_QUEUE)) == 0


def test_publisher_reconnects_after_a_dropped_connection(settings: AmqpSettings, management: Management) -> None:
    with Publisher(settings) as pub:
        pub.publish_uplink("dev-1", "update", b"before")
        kill_connection(management, "fedmask:publisher")
        pub.publish_uplink("dev-1", "update", b"after")
    assert queue_depth(settings, q(settings, AGGREGATOR_QUEUE)) == 2


@dataclass
class Enrolled:
    vhost: str
    admin: AmqpSettings
    a: DeviceCredentials
    b: DeviceCredentials


@pytest.fixture
def enrolled(amqp_service_url: str, management: Management) -> Iterator[Enrolled]:
    u = urlsplit(amqp_service_url)
    vhost = f"fedmask-test-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    host, port = u.hostname or "127.0.0.1", u.port or 5672
    management.ensure_vhost(vhost)
    try:
        a = management.enroll(f"t{tag}-a", vhost=vhost, amqp_host=host, amqp_port=port)
        b = management.enroll(f"t{tag}-b", vhost=vhost, amqp_host=host, amqp_port=port)
        admin = AmqpSettings.from_url(f"{u.scheme}://{u.netloc}/{quote(vhost, safe='')}")
        yield Enrolled(vhost, admin, a, b)
    finally:
        for d in (f"t{tag}-a", f"t{tag}-b"):
            management.delete_device(d, vhost=vhost)
        management.delete_vhost(vhost)


def test_enrolled_device_publishes_as_itself(enrolled: Enrolled) -> None:
    a = enrolled.a
    assert a.username == f"{enrolled.vhost}.{a.device_id}" and a.password not in repr(a)
    with Publisher(enrolled.admin, declare=True):  # the admin's AMQP declare agrees with the HTTP one
        pass
    with Publisher(AmqpSettings.from_url(a.amqp_url)) as pub:
        pub.publish_uplink(a.device_id, "update", b"mine")
    [d] = drain(enrolled.admin, AGGREGATOR_QUEUE, 1)
    assert (d.routing_key, d.user_id, d.body) == (f"device.{a.device_id}.update", a.username, b"mine")


def test_device_cannot_publish_for_another_device_or_spoof_user_id(enrolled: Enrolled) -> None:
    a, b = enrolled.a, enrolled.b
    with Publisher(AmqpSettings.from_url(a.amqp_url)) as pub:
        with pytest.raises(AmqpError) as e:
            pub.publish_uplink(b.device_id, "update", b"impersonation by routing key")
        assert e.value.code == 403 and "ACCESS_REFUSED" in str(e.value)
        with pytest.raises(AmqpError) as e:
            pub.publish_uplink(a.device_id, "update", b"impersonation by user_id", user_id=b.username)
        assert e.value.code == 406 and "user_id" in str(e.value)
        with pytest.raises(AmqpError) as e:
            pub.publish_downlink(b.device_id, b"a device writing to the downlink")
        assert e.value.code == 403
        pub.publish_uplink(a.device_id, "update", b"the one legitimate message")
    assert a.password not in str(e.value)
    assert queue_depth(enrolled.admin, AGGREGATOR_QUEUE) == 1
    assert queue_depth(enrolled.admin, device_queue(b.device_id)) == 0


def test_device_reads_only_its_own_queue_and_configures_nothing(enrolled: Enrolled) -> None:
    a, b = enrolled.a, enrolled.b
    device = AmqpSettings.from_url(a.amqp_url)
    with Publisher(enrolled.admin) as pub:
        pub.publish_downlink(a.device_id, b"task for a")
        pub.publish_downlink(b.device_id, b"task for b")
    [d] = drain(device, device_queue(a.device_id), 1)
    assert d.body == b"task for a"
    with pytest.raises(AmqpError) as e, consuming(device, device_queue(b.device_id), Collector()):
        pass
    assert e.value.code == 403
    with pytest.raises(AmqpError) as e, open_channel(device) as ch:
        declare_topology(ch)
    assert e.value.code == 403
    assert queue_depth(enrolled.admin, device_queue(b.device_id)) == 1


def test_reenrol_rotates_the_password(enrolled: Enrolled, management: Management) -> None:
    old = enrolled.a
    u = urlsplit(old.amqp_url)
    new = management.enroll(old.device_id, vhost=enrolled.vhost, amqp_host=u.hostname or "", amqp_port=u.port or 0)
    assert new.password != old.password
    with pytest.raises(AmqpError) as e:
        Publisher(AmqpSettings.from_url(old.amqp_url))
    assert e.value.code == 403 and old.password not in str(e.value)
    with Publisher(AmqpSettings.from_url(new.amqp_url)) as pub:
        pub.publish_uplink(new.device_id, "hello", b"back")


def test_management_errors_are_clear_and_hold_no_password(management: Management) -> None:
    with pytest.raises(ManagementError, match="rabbitmq-plugins enable rabbitmq_management"):
        Management("http://127.0.0.1:9", timeout=2).list_users()
    with pytest.raises(ManagementError) as e:
        Management(management.api_url, management.user, "not-the-password-xyz").list_users()
    assert e.value.status == 401 and "not-the-password-xyz" not in str(e.value)
    with pytest.raises(ManagementError):
        management.enroll("bad.id")
