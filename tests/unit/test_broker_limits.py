"""Broker user names per vhost, the shipped limits and how status compares a running broker (no services)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from aggregator.dropped_tally import drop_reason
from ops.control.enrolment import DEVICE_LIMITS
from ops.services import broker_limits
from ops.services.broker_limits import largest_message_bytes, read_conf, running_limits, shipped_models_need
from ops.services.deployment import Deployment
from ops.services.local_servers import local_rabbitmq_conf
from shared import codec
from shared.amqp import DEAD_LETTER_LIMITS, UPLINK_LIMITS, AmqpSettings, device_of_user, device_user, vhost_user_prefix
from shared.models import build_model
from shared.presets import model_spec


def test_user_names_carry_the_vhost_and_never_collide() -> None:
    vhosts = ["fedmask", "/", "a.b", "a", "a%2Eb", "a.b.c", "x y", "fedmask-demo", "ünï"]
    devices = ["d", "b", "subject-1", "c", "b-c"]
    names = {(v, d): device_user(d, v) for v, d in itertools.product(vhosts, devices)}
    assert len(set(names.values())) == len(names)  # one-to-one
    for (v, d), name in names.items():
        assert device_of_user(name, v) == d
        assert all(device_of_user(name, other) is None for other in vhosts if other != v)
    assert device_user("subject-1", "fedmask") == "fedmask.subject-1"
    assert device_user("subject-1", "/") == "%2F.subject-1" and vhost_user_prefix("a.b") == "a.b."


@pytest.mark.parametrize("user", [None, "", "guest", "fedmask-aggregator", "device-subject-1", "fedmask.",
                                  "fedmask.a.b", "other.subject-1", "fedmask.bad id"])
def test_only_a_device_user_of_the_vhost_speaks_for_a_device(user: str | None) -> None:
    assert device_of_user(user, "fedmask") is None


def test_shipped_max_message_size_is_the_largest_models_need_rounded_to_a_power_of_two() -> None:
    task, need = shipped_models_need()
    shipped = int(read_conf()["max_message_size"])
    assert task == "mnist" and need == 134_631
    assert shipped == 1 << (need - 1).bit_length()


def test_largest_message_is_what_the_codec_encodes() -> None:
    spec = model_spec("digits", width=32)
    net = build_model(spec)
    head = {"device": "d" * 64, "round": 2**31 - 1, "model": net.fingerprint(), "layout": net.layout_hash()}
    q4 = codec.make_mask(**head, bits=bytes((4 * net.nbits + 7) // 8), nbits=4 * net.nbits, version=2**31 - 1,
                         enc="q4")
    hello = codec.make_hello(**head, structure=bytes((net.nbits + 7) // 8), nbits=net.nbits)
    assert largest_message_bytes(spec) == len(codec.encode(q4)) > len(codec.encode(hello))


def test_make_up_renders_the_shipped_config_for_its_own_port(tmp_path: Path) -> None:
    dep = Deployment(amqp_url="amqp://guest:guest@127.0.0.1:5673/fedmask", redis_url="redis://127.0.0.1:6379/0",
                     run_dir=tmp_path)
    rendered = read_conf(local_rabbitmq_conf(dep))
    shipped = read_conf()
    assert rendered["listeners.tcp.local"] == "127.0.0.1:5673"
    assert not [k for k in rendered if k.startswith("definitions.")]
    for key in ("max_message_size", "disk_free_limit.absolute", "vm_memory_high_watermark.relative",
                "management.tcp.ip", "heartbeat", "consumer_timeout"):
        assert rendered[key] == shipped[key]


def test_drop_reason_reads_dead_letters_entry_of_x_death() -> None:
    assert drop_reason({"x-death": [{"queue": "ns.dead.letters", "reason": "maxlen"}]}) == "maxlen"
    assert drop_reason({"x-death": [{"queue": "aggregator.uplink", "reason": "rejected"},
                                    {"queue": "dead.letters", "reason": "expired"}]}) == "expired"
    assert drop_reason({"x-death": "garbage"}) == "other" and drop_reason({}) == "other"


class FakeManagement:
    """The management API of this development machine's broker, as /api answers for it."""

    def __init__(self, *, bounded: bool) -> None:
        self.bounded = bounded

    def get(self, path: str, *, missing_ok: bool = False) -> Any:
        if path == "/overview":
            return {"listeners": [{"protocol": "amqp", "ip_address": "127.0.0.1", "port": 5672},
                                  {"protocol": "http", "ip_address": "::", "port": 15672,
                                   "socket_opts": {"port": 15672} if not self.bounded else
                                   {"port": 15672, "ip": "127.0.0.1"}}]}
        if path == "/nodes":
            return [{"disk_free_limit": 50_000_000 if not self.bounded else 2_000_000_000,
                     "mem_limit": None, "mem_alarm": False, "disk_free_alarm": False, "config_files": []}]
        if path.startswith("/queues/"):
            bounds = UPLINK_LIMITS if path.endswith("aggregator.uplink") else DEAD_LETTER_LIMITS
            return {"arguments": dict(bounds) if self.bounded else {}, "messages": 3, "message_bytes": 9}
        if path == "/user-limits":
            limits = {"max-connections": DEVICE_LIMITS.max_connections, "max-channels": DEVICE_LIMITS.max_channels}
            return [{"user": "fedmask.a", "value": limits}] if self.bounded else []
        raise AssertionError(path)

    def list_users(self) -> list[str]:
        return ["guest", "fedmask.a", "other.a"]


@pytest.mark.parametrize("bounded", [False, True])
def test_status_warns_where_the_running_broker_differs_from_the_shipped_config(
        bounded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = int(read_conf()["max_message_size"])
    monkeypatch.setattr(broker_limits, "_probe_any_vhost", lambda _a, size: shipped if bounded else None)
    limits = running_limits(FakeManagement(bounded=bounded), AmqpSettings(), "fedmask",  # type: ignore[arg-type]
                            model_need=134_631, dropped={"maxlen": 5})
    warned = {lim.name for lim in limits if lim.ok is False}
    if bounded:
        assert warned == set()
    else:
        assert warned == {"max message size", "disk free limit", "management listener", "dead.letters bounds",
                          "aggregator.uplink bounds", "device user limits"}
        shown = {lim.name: lim.running for lim in limits}
        assert shown["disk free limit"] == "50 MB" and "all addresses" in shown["management listener"]
        assert shown["dead.letters bounds"].startswith("unbounded") and "fedmask.a" in shown["device user limits"]
    assert {lim.name: lim.running for lim in limits}["dead letters dropped"] == "5 maxlen"
