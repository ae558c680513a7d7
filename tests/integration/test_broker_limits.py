"""Broker users per vhost and the shipped limits, on a private RabbitMQ node with the shipped config.

One node per module (tests/shipped_broker.py: broker_config/rabbitmq.conf minus its listeners), each
case on throwaway vhosts of its own. Nothing here touches the machine's broker: its users, limits
and alarms are other people's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from aggregator.dropped_tally import BYTES_COUNTER, COUNTER_PREFIX, DroppedTally
from aggregator.store import RoundStore
from ops.control.enrolment import DEVICE_LIMITS, DeviceCredentials, Management
from ops.services.broker_limits import read_limits, shipped_models_need
from shared.amqp import (
    DEAD_EXCHANGE,
    DEAD_LETTER_LIMITS,
    DEAD_QUEUE,
    DEVICE_QUEUE_MAX_LENGTH,
    DROPPED_QUEUE,
    AmqpError,
    AmqpSettings,
    Consumer,
    Publisher,
    declare_topology,
    device_of_user,
    device_queue,
    open_channel,
    queue_depth,
)
from shared.amqp.connection import probe_max_message_size
from tests.private_services import PrivateRabbitMQ, wait_until
from tests.services import missing
from tests.shipped_broker import rabbitmq_installed, shipped_node

pytestmark = pytest.mark.services

MAX_MESSAGE = 256 * 1024  # broker_config/rabbitmq.conf


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    if not rabbitmq_installed():
        missing("an installed rabbitmq-server (for a private node with the shipped configuration)")
    with shipped_node(Path(tmp_path_factory.mktemp("broker-limits"))) as n:
        yield n


@pytest.fixture()
def mgmt(node: PrivateRabbitMQ) -> Management:
    return Management(node.management_url, "guest", "guest")


@pytest.fixture()
def vhosts(mgmt: Management) -> Iterator[list[str]]:
    """Two throwaway vhosts, deleted afterwards with every device user enrolled in them."""
    tag = uuid.uuid4().hex[:6]
    names = [f"lim-{tag}-a", f"lim.{tag}/b%"]  # the second one needs escaping in a user name
    for v in names:
        mgmt.ensure_vhost(v)
    yield names
    for v in names:
        for user in mgmt.list_users():
            if device_of_user(user, v) is not None:
                mgmt._request("DELETE", f"/users/{quote(user, safe='')}", missing_ok=True)
        mgmt.delete_vhost(v)


def _admin(node: PrivateRabbitMQ, vhost: str) -> AmqpSettings:
    return AmqpSettings.from_url(node.amqp_url(vhost))


def _creds(node: PrivateRabbitMQ, c: DeviceCredentials) -> AmqpSettings:
    assert f":{node.amqp_port}/" in c.amqp_url
    return AmqpSettings.from_url(c.amqp_url)


def _enroll(mgmt: Management, node: PrivateRabbitMQ, device: str, vhost: str) -> DeviceCredentials:
    return mgmt.enroll(device, vhost=vhost, amqp_port=node.amqp_port)


def _alive(pub: Publisher) -> bool:
    """Whether the publisher's connection is still open, after reading what the broker sent."""
    conn = pub._connection
    try:
        conn.process_data_events(0)
    except Exception:
        return False
    return bool(conn.is_open)


# ------------------------------------------------------------------------------------------ users per vhost


def test_the_same_device_in_two_vhosts_is_two_users_each_confined_to_its_vhost(
        node: PrivateRabbitMQ, mgmt: Management, vhosts: list[str]) -> None:
    a_vhost, b_vhost = vhosts
    a, b = (_enroll(mgmt, node, "board-7", v) for v in vhosts)
    assert a.username == f"{a_vhost}.board-7" and b.username == f"{quote(b_vhost, safe='')}.board-7"
    assert {a.username, b.username} <= set(mgmt.list_users())
    assert device_of_user(a.username, a_vhost) == "board-7" and device_of_user(a.username, b_vhost) is None
    assert device_of_user(b.username, b_vhost) == "board-7" and device_of_user(b.username, a_vhost) is None
    # Each user's credentials work on its own vhost only.
    for mine, other in ((a, b_vhost), (b, a_vhost)):
        with Publisher(AmqpSettings.from_url(_creds(node, mine).url)) as pub:
            pub.publish_uplink("board-7", "hello", b"home")
        stolen = AmqpSettings.from_url(_creds(node, mine).url.rsplit("/", 1)[0] + "/" + quote(other, safe=""))
        with pytest.raises(AmqpError) as refused:
            Publisher(stolen)
        assert refused.value.code in (403, 530) and mine.password not in str(refused.value)


def test_reenrolling_in_one_vhost_leaves_the_other_vhosts_user_and_connections_alone(
        node: PrivateRabbitMQ, mgmt: Management, vhosts: list[str]) -> None:
    a_vhost, b_vhost = vhosts
    a_old = _enroll(mgmt, node, "board-8", a_vhost)
    b = _enroll(mgmt, node, "board-8", b_vhost)
    a_pub, b_pub = Publisher(_creds(node, a_old)), Publisher(_creds(node, b))
    try:
        wait_until(lambda: {c["user"] for c in mgmt.list_connections()} >= {a_old.username, b.username}, 20,
                   "both connections listed by the management API")
        a_new = _enroll(mgmt, node, "board-8", a_vhost)  # rotates a's password, closes a's connections
        assert a_new.password != a_old.password
        wait_until(lambda: not _alive(a_pub), 20, "a's old connection closed by the broker")
        assert _alive(b_pub)
        b_connection = b_pub._connection
        b_pub.publish_uplink("board-8", "update", b"b's connection survived")
        assert b_pub._connection is b_connection  # published on the same connection: no reconnect
        with pytest.raises(AmqpError):
            Publisher(_creds(node, a_old))  # the old password is gone
        with Publisher(_creds(node, a_new)) as pub:
            pub.publish_uplink("board-8", "update", b"a is back")
    finally:
        a_pub.close()
        b_pub.close()
    assert queue_depth(_admin(node, b_vhost), "aggregator.uplink") == 1


def test_enrolment_refuses_to_overwrite_an_operator_user_named_like_a_device(
        node: PrivateRabbitMQ, mgmt: Management, vhosts: list[str]) -> None:
    name = f"{vhosts[0]}.ops"
    mgmt._put_user(name, "operator-password", tags="administrator")
    try:
        with pytest.raises(Exception, match="not a device user"):
            _enroll(mgmt, node, "ops", vhosts[0])
    finally:
        mgmt._request("DELETE", f"/users/{quote(name, safe='')}", missing_ok=True)


def test_a_board_can_passively_declare_other_queues_and_nothing_more(
        node: PrivateRabbitMQ, mgmt: Management, vhosts: list[str]) -> None:
    """RabbitMQ 3.10 checks no permission on a passive queue.declare (docs/deployment.md says what
    that exposes): a board learns another board's queue depth and consumer count, no more."""
    vhost = vhosts[0]
    spy, victim = _enroll(mgmt, node, "spy", vhost), _enroll(mgmt, node, "victim", vhost)
    with Publisher(_admin(node, vhost)) as pub:
        for _ in range(3):
            pub.publish_downlink("victim", b"a task")
    spy_settings = _creds(node, spy)
    with open_channel(spy_settings) as ch:
        seen = ch.queue_declare(queue=device_queue("victim"), passive=True).method
    assert (seen.message_count, seen.consumer_count) == (3, 0)
    with pytest.raises(AmqpError) as e, open_channel(spy_settings) as ch:
        ch.queue_declare(queue=device_queue("victim"), durable=True, arguments={"x-dead-letter-exchange": DEAD_EXCHANGE,
                         "x-max-length": DEVICE_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"})
    assert e.value.code == 403
    with pytest.raises(AmqpError) as e, open_channel(spy_settings) as ch:
        ch.basic_get(queue=device_queue("victim"))
    assert e.value.code == 403
    assert victim.username != spy.username and queue_depth(_admin(node, vhost), device_queue("victim")) == 3


# ------------------------------------------------------------------------------------------ limits


def test_device_users_get_connection_and_channel_limits(node: PrivateRabbitMQ, mgmt: Management,
                                                        vhosts: list[str]) -> None:
    c = _enroll(mgmt, node, "greedy", vhosts[0])
    assert c.limits == DEVICE_LIMITS
    assert mgmt.user_limits(c.username) == {"max-connections": DEVICE_LIMITS.max_connections,
                                            "max-channels": DEVICE_LIMITS.max_channels}
    settings = _creds(node, c)
    pubs = [Publisher(settings) for _ in range(DEVICE_LIMITS.max_connections)]
    try:
        with pytest.raises(AmqpError) as e:
            Publisher(settings)
        assert e.value.code == 530 and "connection limit" in str(e.value)
    finally:
        for p in pubs:
            p.close()
    from shared.amqp.connection import _connect

    conn = _connect(settings, "channels")
    try:
        with pytest.raises(Exception, match=r"channel|maximum"):
            for _ in range(DEVICE_LIMITS.max_channels + 1):
                conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def test_max_message_size_is_the_shipped_one_and_fits_the_largest_model(node: PrivateRabbitMQ) -> None:
    settings = _admin(node, "/")
    assert probe_max_message_size(settings, MAX_MESSAGE + 1) == MAX_MESSAGE
    assert probe_max_message_size(settings, MAX_MESSAGE) is None
    assert shipped_models_need()[1] <= MAX_MESSAGE


def test_device_queue_keeps_its_newest_messages(node: PrivateRabbitMQ, mgmt: Management, vhosts: list[str]) -> None:
    vhost = vhosts[0]
    _enroll(mgmt, node, "offline", vhost)
    admin = _admin(node, vhost)
    with Publisher(admin) as pub:
        for i in range(DEVICE_QUEUE_MAX_LENGTH + 5):
            pub.publish_downlink("offline", b"task %d" % i)
    assert queue_depth(admin, device_queue("offline")) == DEVICE_QUEUE_MAX_LENGTH
    wait_until(lambda: queue_depth(admin, DEAD_QUEUE) == 5, 10, "the 5 oldest tasks in dead.letters")
    with open_channel(admin) as ch:
        _m, props, body = ch.basic_get(queue=DEAD_QUEUE, auto_ack=True)
    assert body == b"task 0" and props.headers["x-death"][0]["reason"] == "maxlen"


def test_dead_letters_is_bounded_and_what_it_drops_is_counted(node: PrivateRabbitMQ, mgmt: Management,
                                                              vhosts: list[str], store: RoundStore) -> None:
    """Fill dead.letters past its byte bound with maximum-size letters: it keeps at most its bound,
    and every letter it pushes out is counted by the aggregator's tally, byte for byte."""
    vhost = vhosts[0]
    admin = _admin(node, vhost)
    mgmt.ensure_topology(vhost)
    bound = DEAD_LETTER_LIMITS["x-max-length-bytes"]
    body = bytes(MAX_MESSAGE)
    sent = bound // MAX_MESSAGE + 40
    with open_channel(admin) as ch:
        ch.confirm_delivery()
        for _ in range(sent):
            ch.basic_publish(DEAD_EXCHANGE, "x", body)
    q = mgmt.get(f"/queues/{quote(vhost, safe='')}/{DEAD_QUEUE}")
    wait_until(lambda: queue_depth(admin, DEAD_QUEUE) + queue_depth(admin, DROPPED_QUEUE) == sent, 20,
               "every letter in dead.letters or dead.dropped")
    kept = queue_depth(admin, DEAD_QUEUE)
    assert kept * MAX_MESSAGE <= bound and kept >= bound // MAX_MESSAGE - 1, q
    stop = threading.Event()
    tally = Consumer(admin, DROPPED_QUEUE, DroppedTally(store, stop).on_delivery, prefetch=64)
    tally.start_in_thread()
    try:
        wait_until(lambda: store.counters().get(f"{COUNTER_PREFIX}:maxlen", 0) == sent - kept, 30,
                   "the tally to count every dropped letter")
    finally:
        tally.stop()
    counters = store.counters()
    assert counters[BYTES_COUNTER] == (sent - kept) * MAX_MESSAGE
    assert queue_depth(admin, DROPPED_QUEUE) == 0


def test_an_old_unbounded_dead_letters_queue_is_refused_with_the_way_out(node: PrivateRabbitMQ, mgmt: Management,
                                                                          vhosts: list[str]) -> None:
    admin = _admin(node, vhosts[0])
    with open_channel(admin) as ch:
        ch.queue_declare(queue=DEAD_QUEUE, durable=True)  # what releases before the limits declared
    with pytest.raises(AmqpError) as e, open_channel(admin) as ch:
        declare_topology(ch)
    assert e.value.code == 406 and "docs/deployment.md" in str(e.value)


def test_status_reads_the_shipped_limits_without_warnings(node: PrivateRabbitMQ, mgmt: Management,
                                                          vhosts: list[str]) -> None:
    vhost = vhosts[0]
    _enroll(mgmt, node, "limited", vhost)
    section = read_limits(node.management_url, node.amqp_url(vhost), "guest", "guest", vhost,
                          model_need=shipped_models_need()[1], dropped={})
    shown = {lim["name"]: lim for lim in section["limits"]}
    assert section["warnings"] == [], section
    assert shown["max message size"]["running"] == "256 KiB"
    assert shown["disk free limit"]["running"] == "2 GB"
    assert shown["management listener"]["running"].startswith("127.0.0.1:")
    assert "drop-head" in shown["dead.letters bounds"]["running"]
    assert shown["device user limits"]["running"].startswith("1 of 1")
    assert shown["resource alarms"]["running"] == "none"
    # A device user without limits (enrolled by an older release) is named in a warning.
    mgmt._request("DELETE", f"/user-limits/{quote(vhost, safe='')}.limited/max-channels")
    time.sleep(0.2)
    again = read_limits(node.management_url, node.amqp_url(vhost), "guest", "guest", vhost)
    assert any("device user limits" in w and "limited" in w for w in again["warnings"]), again
