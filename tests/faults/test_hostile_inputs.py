"""Hostile uplink traffic against the real aggregator service.

The aggregator (AggregatorService: its uplink consumer thread and its deadline ticker) runs in this
process against a throwaway vhost and its own Redis key prefix. Six devices are enrolled, each with
its own broker user, and say hello with real DeviceRuntime hellos. Five are sampled for round 1
(quorum 4): four answer honestly, the laggard answers only after the round has closed, the outsider
is never sampled. Around the honest updates, enrolled devices send every bad message in EXPECTED.
Each must end in exactly one of three ways:

  dead-lettered once, with x-reject-reason = the expected reason, and counted in rejected:<reason>;
  acked as a no-op (the same update twice), and counted in updates:duplicate;
  refused by the broker at the door (the publishing channel is closed; nothing reaches the queue).

Afterwards the aggregator must still be alive and consuming, and the merged masks the honest devices
received must be byte for byte those of an undisturbed run: fresh devices with the same ids, data and
seeds, AggregatorCore over an in-memory transport, no hostile traffic.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import msgpack
import numpy as np
import pytest
import redis

from aggregator.core import AggregatorCore
from aggregator.service import AggregatorService, ServiceSettings
from aggregator.store import RoundStore
from ops.bench.raw_broker import publish_without_user_id
from ops.control.enrolment import Management, ManagementError
from shared import codec
from shared.amqp import (
    AGGREGATOR_QUEUE,
    DEAD_QUEUE,
    REASON_HEADER,
    UPLINK_EXCHANGE,
    AmqpError,
    AmqpSettings,
    Publisher,
    device_queue,
    device_user,
    open_channel,
    queue_depth,
)
from shared.bits import scatter, unpack
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.presets import model_spec, preset
from shared.transport import InMemoryTransport
from tests.services import missing

pytestmark = pytest.mark.services

TASK, WIDTH, SEED, ROUND = "digits", 32, 0, 1
HONEST = ("alice", "bob", "carol", "dave")
ROLES = (*HONEST, "laggard", "outsider")
SAMPLED = (*HONEST, "laggard")  # the outsider says hello but is never sampled
QUORUM = 0.8  # 4 of the 5 sampled: the round closes on the last honest update, without the laggard
DEADLINE_S = 120.0  # far away: only the quorum may close the round while the test runs

DEAD, ACKED, REFUSED = "dead-lettered", "acked (no-op)", "refused by the broker"

# case -> (outcome, detail). detail is the x-reject-reason (and rejected:<reason> counter) for DEAD,
# the broker's reply for REFUSED, empty for ACKED (the updates:duplicate counter is checked apart).
EXPECTED: dict[str, tuple[str, str]] = {
    "undecodable bytes": (DEAD, "undecodable"),
    "truncated msgpack (a real update cut in half)": (DEAD, "undecodable"),
    "wrong protocol version": (DEAD, "bad_version"),
    "missing field (crc32)": (DEAD, "missing_field"),
    "mistyped field (round as a string)": (DEAD, "bad_type"),
    "mask one bit short of the structure": (DEAD, "bad_length"),
    "bits shorter than nbits says": (DEAD, "bad_length"),
    # enc "structure" carries only the bits inside S_i, so it cannot express a 1 outside it (asserted
    # in the test); the two ways left to try are a full-length update and a hello with another structure.
    "full-encoding update with a 1 outside the structure": (DEAD, "bad_length"),
    "hello whose structure gained a bit": (DEAD, "structure_changed"),
    "wrong weights fingerprint": (DEAD, "wrong_model"),
    "unknown round": (DEAD, "unknown_round"),
    "device not sampled": (DEAD, "not_sampled"),
    "duplicate (the same update twice)": (ACKED, ""),
    "body names another device": (DEAD, "spoofed_device"),
    # RabbitMQ validates a user_id property but does not add a missing one: the aggregator must not
    # take a message without one for anybody's.
    "no user_id property": (DEAD, "spoofed_device"),
    "oversized (codec limit + 1 byte)": (DEAD, "too_large"),
    "user_id property of another device": (REFUSED, "406 PRECONDITION_FAILED"),
    "routing key of another device": (REFUSED, "403 ACCESS_REFUSED"),
    "closed round (the laggard's real update)": (DEAD, "round_closed"),
}
OVERSIZED = "oversized (codec limit + 1 byte)"


# ------------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Device:
    runtime: DeviceRuntime
    amqp: AmqpSettings  # the device's own broker user on the test vhost

    @property
    def id(self) -> str:
        return self.runtime.device_id


def make_runtimes(tag: str) -> dict[str, DeviceRuntime]:
    """One DeviceRuntime per role on its own slice of the data. Called twice (attacked and undisturbed
    run): same ids, data and seeds, so pruning and training give the same bits both times."""
    data = load_task(TASK, num_devices=preset(TASK).devices, seed=SEED)
    spec = model_spec(TASK, width=WIDTH, seed=SEED)
    cfg = FedMaskConfig(train=preset(TASK).mask_train, local_epochs=2)
    return {role: DeviceRuntime(f"hz{tag}-{role}", spec, cfg, (part.train.x, part.train.y), SEED)
            for role, part in zip(ROLES, data.devices[:len(ROLES)], strict=True)}


# ------------------------------------------------------------------------------------------ the deployment


@dataclass
class Deployment:
    admin: AmqpSettings  # the management user on the test vhost: opens rounds, reads dead letters
    redis_url: str
    tag: str
    store: RoundStore  # the test's own view of the aggregator's Redis keys
    devices: dict[str, Device]  # role -> enrolled device
    thread: threading.Thread  # runs AggregatorService.run
    crashes: list[BaseException]  # whatever ended AggregatorService.run early

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `condition`; fail at once if the aggregator died, since nothing will change then."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), f"the aggregator died while waiting for {what}: {self.crashes}"
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)


def poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether `condition` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _management(amqp_url: str) -> Management:
    u = urlsplit(amqp_url)
    api = os.environ.get("FEDMASK_TEST_MANAGEMENT_URL", f"http://{u.hostname}:15672")
    management = Management(api, unquote(u.username or "guest"), unquote(u.password or "guest"))
    try:
        management.list_users()
    except ManagementError as exc:  # enrolment needs it: skip locally, fail under CI=true
        missing(f"RabbitMQ management API ({exc})")
    return management


def _delete_keys(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}*".encode()):
        client.delete(key)


def _stop(service: AggregatorService, thread: threading.Thread) -> None:
    service.stop.set()
    thread.join(timeout=40)


@pytest.fixture()
def deployment(amqp_service_url: str, redis_service_url: str) -> Iterator[Deployment]:
    management = _management(amqp_service_url)
    u = urlsplit(amqp_service_url)
    tag = uuid.uuid4().hex[:8]
    vhost = f"fedmask-faults-{tag}"
    # Its own prefix, not fm:: other tests and demos use fm:* in the same Redis db, possibly right now.
    prefix = f"test:faults:{tag}:"
    admin = AmqpSettings.from_url(f"{u.scheme}://{u.netloc}/{quote(vhost, safe='')}")
    with ExitStack() as cleanup:  # unwinds in reverse: aggregator, Redis keys, devices, vhost
        management.ensure_vhost(vhost)
        cleanup.callback(management.delete_vhost, vhost)
        devices = {}
        for role, runtime in make_runtimes(tag).items():
            cleanup.callback(management.delete_device, runtime.device_id, vhost=vhost)
            creds = management.enroll(runtime.device_id, vhost=vhost, amqp_host=u.hostname or "127.0.0.1",
                                      amqp_port=u.port or 5672)
            devices[role] = Device(runtime, AmqpSettings.from_url(creds.amqp_url))
        client = redis.Redis.from_url(redis_service_url)
        cleanup.callback(client.close)
        cleanup.callback(_delete_keys, client, f"test:faults*:{tag}:")  # this run's and the undisturbed run's
        service = AggregatorService(ServiceSettings(amqp_url=admin.url, redis_url=redis_service_url, task=TASK,
                                                    width=WIDTH, seed=SEED, redis_prefix=prefix,
                                                    ack_durability="unchecked"))  # the machine's Redis
        crashes: list[BaseException] = []

        def run_service() -> None:
            try:
                service.run()
            except BaseException as exc:
                crashes.append(exc)
                raise

        thread = threading.Thread(target=run_service, name="aggregator-under-test", daemon=True)
        thread.start()
        cleanup.callback(_stop, service, thread)
        yield Deployment(admin, redis_service_url, tag, RoundStore(client, prefix=prefix), devices, thread, crashes)


# ------------------------------------------------------------------------------------------ the attack


@dataclass(frozen=True)
class Sent:
    case: str
    routing_key: str
    user_id: str | None  # the user_id property as published (None: left out)
    body: bytes


class Attack:
    """Every hostile message sent, and the ones the broker refused at the door."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.refused: dict[str, AmqpError] = {}

    def publish(self, case: str, link: Publisher, device_id: str, kind: str, body: bytes, *,
                user_id: str | None = None) -> None:
        user = user_id or link.settings.username
        self._send(case, f"device.{device_id}.{kind}", user, body,
                   lambda: link.publish_uplink(device_id, kind, body, user_id=user))

    def publish_without_user_id(self, case: str, settings: AmqpSettings, device_id: str, kind: str,
                                body: bytes) -> None:
        key = f"device.{device_id}.{kind}"
        self._send(case, key, None, body, lambda: publish_without_user_id(settings, UPLINK_EXCHANGE, key, body))

    def _send(self, case: str, key: str, user: str | None, body: bytes, publish: Callable[[], None]) -> None:
        assert case in EXPECTED and case not in {s.case for s in self.sent}, case
        self.sent.append(Sent(case, key, user, body))
        try:
            publish()
        except AmqpError as err:  # recorded, not assumed: the outcome table says whether it was expected
            self.refused[case] = err


def repacked(body: bytes, **fields: object) -> bytes:
    """A real message with wire fields replaced (None removes one), packed without the codec's checks."""
    wire = msgpack.unpackb(body, raw=False)
    for name, value in fields.items():
        if value is None:
            del wire[name]
        else:
            wire[name] = value
    return bytes(msgpack.packb(wire))


@dataclass(frozen=True)
class DeadLetter:
    routing_key: str | None
    user_id: str | None
    reason: str | None
    body: bytes


def take_queue(settings: AmqpSettings, queue: str) -> list[tuple[Any, bytes]]:
    """Every message in `queue` right now, as (properties, body), removed from it."""
    taken = []
    with open_channel(settings) as channel:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))


def take_dead_letters(settings: AmqpSettings) -> list[DeadLetter]:
    letters = []
    for properties, body in take_queue(settings, DEAD_QUEUE):
        headers = properties.headers or {}
        letters.append(DeadLetter(headers.get("x-original-routing-key"), headers.get("x-original-user-id"),
                                  headers.get(REASON_HEADER), body))
    return letters


def broker_reply(err: AmqpError) -> str:
    """'403 ACCESS_REFUSED' from an AmqpError's message (the code and the reply text's name)."""
    found = re.search(r"\b(\d{3}) ([A-Z_]+)\b", str(err))
    return f"{found[1]} {found[2]}" if found else f"{err.code} (no reply text: {err})"


def without_stats(update: bytes) -> codec.Message:
    """An update minus its stats: train_seconds is wall-clock time, the rest must be reproducible."""
    return dataclasses.replace(codec.decode(update, expect_type="update"), stats=None)


def take_one(device: Device, mtype: str) -> codec.Message:
    [(_, body)] = take_queue(device.amqp, device_queue(device.id))
    return codec.decode(body, expect_type=mtype)


# ------------------------------------------------------------------------------------------ the control


def undisturbed_round(redis_url: str, tag: str) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, Any]]:
    """The same round with fresh devices and no hostile traffic, through AggregatorCore and an
    in-memory transport: (honest update bodies, merged mask bodies, stored masks), by role."""
    runtimes = make_runtimes(tag)
    client = redis.Redis.from_url(redis_url)
    try:
        store = RoundStore(client, prefix=f"test:faults-undisturbed:{tag}:")
        bus = InMemoryTransport()
        core = AggregatorCore(store, bus, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
        for rt in runtimes.values():
            assert core.handle(f"device.{rt.device_id}.hello", rt.device_id, codec.encode(rt.hello())).action == "ack"
        core.start_round(candidates=sorted(runtimes[r].device_id for r in SAMPLED), quorum=QUORUM,
                         deadline_s=DEADLINE_S, seed=SEED)
        updates = {}
        for role in HONEST:
            rt = runtimes[role]
            [task] = bus.take_downlink(rt.device_id)
            updates[role] = codec.encode(rt.handle_task(codec.decode(task, expect_type="task")))
        for role in HONEST:  # in the order the attacked run sends them
            assert core.handle(f"device.{runtimes[role].device_id}.update", runtimes[role].device_id,
                               updates[role]).action == "ack"
        masks = {}
        for role in HONEST:
            [masks[role]] = bus.take_downlink(runtimes[role].device_id)
        return updates, masks, {role: store.mask(runtimes[role].device_id) for role in HONEST}
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ the test


def test_hostile_uplink_is_dead_lettered_once_with_its_reason(deployment: Deployment) -> None:
    dep, store = deployment, deployment.store
    dev = dep.devices
    alice, bob, dave, laggard, outsider = dev["alice"], dev["bob"], dev["dave"], dev["laggard"], dev["outsider"]
    nbits = alice.runtime.nbits
    with ExitStack() as links:
        uplink = {role: links.enter_context(Publisher(d.amqp)) for role, d in dev.items()}

        # Everyone says hello; the operator opens round 1 for five of them, as `round start` would.
        for role, d in dev.items():
            uplink[role].publish_uplink(d.id, "hello", codec.encode(d.runtime.hello()))
        dep.wait_for(lambda: store.device_ids() == sorted(d.id for d in dev.values()), 20, "every hello")
        with Publisher(dep.admin) as operator_link:
            operator = AggregatorCore(store, operator_link, model_spec(TASK, width=WIDTH, seed=SEED), merge="head")
            info = operator.start_round(candidates=sorted(dev[r].id for r in SAMPLED), quorum=QUORUM,
                                        deadline_s=DEADLINE_S, seed=SEED)
        assert info.quorum == len(HONEST) and info.sampled == sorted(dev[r].id for r in SAMPLED)

        # Real training: the sampled devices on their tasks, the outsider on a task it never got.
        updates = {role: codec.encode(dev[role].runtime.handle_task(take_one(dev[role], "task"))) for role in SAMPLED}
        forged_task = codec.make_task(device=outsider.id, round=ROUND, model=outsider.runtime.fingerprint,
                                      layout=outsider.runtime.layout, bits=b"", nbits=0, version=0,
                                      deadline=time.time() + DEADLINE_S)
        updates["outsider"] = codec.encode(outsider.runtime.handle_task(forged_task))

        # The raw material of the crafted cases: alice's real update and structure.
        real = codec.decode(updates["alice"])
        assert real.bits is not None and alice.runtime.structure is not None
        structure = unpack(alice.runtime.structure, nbits)
        outside = int(np.flatnonzero(~structure)[0])  # a position alice pruned away
        full_mask = unpack(scatter(np.frombuffer(real.bits, np.uint8), alice.runtime.structure, nbits), nbits).copy()
        # By construction an enc "structure" update cannot set a bit outside S_i: even all ones land inside.
        all_ones = np.frombuffer(codec.pack_bits(np.ones(int(structure.sum()), bool))[0], np.uint8)
        assert not unpack(scatter(all_ones, alice.runtime.structure, nbits), nbits)[~structure].any()
        full_mask[outside] = True
        head = {"device": alice.id, "round": ROUND, "model": real.model, "layout": real.layout}
        short_bits = real.bits[:-1]
        grown = structure.copy()
        grown[outside] = True

        attack = Attack()
        alice_link = uplink["alice"]
        alice_link.publish_uplink(alice.id, "update", updates["alice"])  # honest, stored
        attack.publish("undecodable bytes", alice_link, alice.id, "update", b"\xc1 is never valid msgpack")
        attack.publish("truncated msgpack (a real update cut in half)", alice_link, alice.id, "update",
                       updates["alice"][:len(updates["alice"]) // 2])
        attack.publish("wrong protocol version", alice_link, alice.id, "update",
                       repacked(updates["alice"], v=codec.PROTOCOL_VERSION + 1))
        attack.publish("missing field (crc32)", alice_link, alice.id, "update", repacked(updates["alice"], crc32=None))
        attack.publish("mistyped field (round as a string)", alice_link, alice.id, "update",
                       repacked(updates["alice"], round=str(ROUND)))
        attack.publish("mask one bit short of the structure", alice_link, alice.id, "update", codec.encode(
            codec.make_update(**head, bits=real.unpack()[:-1], version=real.version or 0)))
        attack.publish("bits shorter than nbits says", alice_link, alice.id, "update",
                       repacked(updates["alice"], bits=short_bits, crc32=zlib.crc32(short_bits)))
        attack.publish("full-encoding update with a 1 outside the structure", alice_link, alice.id, "update",
                       codec.encode(codec.make_update(**head, bits=full_mask, version=real.version or 0, enc="full")))
        attack.publish("hello whose structure gained a bit", alice_link, alice.id, "hello",
                       codec.encode(codec.make_hello(**head, structure=grown)))
        attack.publish("wrong weights fingerprint", alice_link, alice.id, "update",
                       codec.encode(dataclasses.replace(real, model="0" * len(real.model))))
        attack.publish("unknown round", alice_link, alice.id, "update",
                       codec.encode(dataclasses.replace(real, round=ROUND + 1000)))
        attack.publish("device not sampled", uplink["outsider"], outsider.id, "update", updates["outsider"])
        attack.publish("duplicate (the same update twice)", alice_link, alice.id, "update", updates["alice"])
        attack.publish("body names another device", alice_link, alice.id, "update", updates["bob"])
        attack.publish_without_user_id("no user_id property", alice.amqp, alice.id, "update", updates["alice"])
        attack.publish(OVERSIZED, alice_link, alice.id, "update", bytes(codec.MAX_MESSAGE_BYTES + 1))
        attack.publish("user_id property of another device", alice_link, alice.id, "update", updates["alice"],
                       user_id=device_user(bob.id, bob.amqp.vhost))
        attack.publish("routing key of another device", alice_link, bob.id, "update", updates["bob"])

        # The other honest updates: the fourth meets the quorum and closes the round.
        for role in HONEST[1:]:
            uplink[role].publish_uplink(dev[role].id, "update", updates[role])
        dep.wait_for(lambda: getattr(store.info(ROUND), "state", None) == "closed", 20, "the quorum to close round 1")
        attack.publish("closed round (the laggard's real update)", uplink["laggard"], laggard.id, "update",
                       updates["laggard"])

        # Still consuming: a hello sent after everything else is taken (dave was last touched before
        # the close, so only this hello can move his heartbeat past probe_sent_at).
        probe_sent_at = time.time()
        uplink["dave"].publish_uplink(dave.id, "hello", codec.encode(dave.runtime.hello()))
        dep.wait_for(lambda: dave.id in store.alive(since=probe_sent_at), 20, "the aggregator to take a late hello")
    assert dep.thread.is_alive() and not dep.crashes

    # broker_config/rabbitmq.conf sets max_message_size to the codec's limit, so a broker configured
    # from it refuses the oversized message at the door; one on RabbitMQ 3.x's default (128 MiB) lets it
    # through and the codec must refuse it. Either way it must not vanish.
    expected = dict(EXPECTED)
    if OVERSIZED in attack.refused and "larger than configured max size" in str(attack.refused[OVERSIZED]):
        expected[OVERSIZED] = (REFUSED, "406 PRECONDITION_FAILED")
    dead_expected = sum(outcome == DEAD for outcome, _ in expected.values())
    # Not an assertion: if one is missing, the outcome table below says which case it was.
    poll(lambda: queue_depth(dep.admin, DEAD_QUEUE) >= dead_expected, 20)
    time.sleep(0.3)  # a case dead-lettered twice would land by now
    letters = take_dead_letters(dep.admin)

    # Which case each dead letter is: routing key, user_id and body together tell them apart.
    case_of = {(s.routing_key, s.user_id, s.body): s.case for s in attack.sent}
    assert len(case_of) == len(attack.sent), "two cases are indistinguishable in dead.letters"
    reasons: defaultdict[str, list[str | None]] = defaultdict(list)
    strangers = []
    for letter in letters:
        case = case_of.get((letter.routing_key, letter.user_id, letter.body))
        if case is None:
            strangers.append((letter.routing_key, letter.user_id, letter.reason, letter.body[:40]))
        else:
            reasons[case].append(letter.reason)
    observed: dict[str, tuple[str, str]] = {}
    for s in attack.sent:
        if s.case in attack.refused:
            observed[s.case] = (REFUSED, broker_reply(attack.refused[s.case]))
        elif s.case in reasons:
            got = reasons[s.case]
            observed[s.case] = (DEAD, str(got[0]) if len(got) == 1 else f"{len(got)} dead letters: {got}")
        else:
            observed[s.case] = (ACKED, "")
    print("\n".join(f"{case:<55} {outcome:<22} {detail}" for case, (outcome, detail) in observed.items()))
    assert observed == expected
    assert not strangers, f"dead letters that are no hostile case (an honest message rejected?): {strangers}"
    assert not [x for x in letters if x.routing_key == f"device.{bob.id}.update"], "a refused publish got through"

    # Counted: each rejection under its reason, the duplicate as a no-op, nothing else.
    counters = store.counters()
    assert counters == dict(Counter(f"rejected:{detail}" for outcome, detail in expected.values() if outcome == DEAD)
                            + Counter({"updates:stored": len(HONEST), "updates:duplicate": 1, "late:dropped": 1,
                                       "rounds:closed": 1}))
    # Nothing vanishes: every hostile message is a dead letter, an acked duplicate or a broker refusal.
    assert len(attack.sent) == len(letters) + counters["updates:duplicate"] + len(attack.refused)
    assert queue_depth(dep.admin, AGGREGATOR_QUEUE) == 0

    # The round is exactly the honest one, and the hostile hello changed no structure.
    closed = store.info(ROUND)
    assert closed is not None and closed.state == "closed"
    assert closed.received == sorted(dev[r].id for r in HONEST) and closed.late == [laggard.id]
    assert store.structure(alice.id) == alice.runtime.structure.tobytes()
    masks = {role: take_queue(dev[role].amqp, device_queue(dev[role].id)) for role in ROLES}
    assert not masks["laggard"] and not masks["outsider"], "only participants get a merged mask"

    # Bit for bit what an undisturbed run of the same round gives.
    clean_updates, clean_masks, clean_stored = undisturbed_round(dep.redis_url, dep.tag)
    assert {r: without_stats(clean_updates[r]) for r in HONEST} == {r: without_stats(updates[r]) for r in HONEST}, \
        "training is not deterministic: there is no baseline to compare with"
    assert {r: [body for _, body in masks[r]] for r in HONEST} == {r: [clean_masks[r]] for r in HONEST}
    assert {r: store.mask(dev[r].id) for r in HONEST} == clean_stored
