"""RoundStore against a real Redis (db 15); each test owns a unique key prefix and deletes it after."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from aggregator.store import RoundStore, StoreError, redact_url
from shared.errors import ConfigError

pytestmark = pytest.mark.services

T0 = 1_700_000_000.0
S_A, S_B = b"\xf0\x0f", b"\xff\x00"


def enrol(store: RoundStore, *ids: str) -> None:
    for d in ids:
        store.register_device(d, profile="pi4", fingerprint="ab" * 8, structure=S_A, now=T0)


def open_one(store: RoundStore, r: int = 1, sampled: tuple[str, ...] = ("d1", "d2", "d3"), quorum: int = 2,
             deadline: float = T0 + 60) -> None:
    store.open_round(r, sampled=list(sampled), deadline=deadline, quorum=quorum, now=T0, policy={"quorum": 0.6})


def close(store: RoundStore, r: int) -> None:
    assert store.try_close(r, T0 + 10_000)
    store.mark_closed(r, T0 + 10_001)


# -- devices ------------------------------------------------------------------------------
def test_register_is_idempotent_and_structure_is_fixed(store: RoundStore) -> None:
    store.register_device("d1", profile="pi4", fingerprint="ab" * 8, structure=S_A, now=T0)
    store.register_device("d1", profile="jetson", fingerprint="ab" * 8, structure=S_A, now=T0 + 5)
    store.register_device("d2", profile="pi4", fingerprint="ab" * 8, structure=S_B, now=T0)
    assert store.device_ids() == ["d1", "d2"]
    assert store.structure("d1") == S_A and store.structure("nope") is None
    h = store.client.hgetall(store.prefix + "device:d1")
    assert h[b"profile"] == b"jetson" and float(h[b"enrolled_at"]) == T0 and float(h[b"last_seen"]) == T0 + 5
    with pytest.raises(StoreError, match="structure"):
        store.register_device("d1", profile="pi4", fingerprint="ab" * 8, structure=S_B, now=T0 + 6)
    assert store.structure("d1") == S_A


def test_touch_and_alive(store: RoundStore) -> None:
    enrol(store, "d1", "d2", "d3")
    store.touch("d1", T0 + 100)
    store.touch("d2", T0 + 50)
    store.touch("d2", T0 + 20)  # an older heartbeat never moves it back
    store.touch("ghost", T0 + 100)  # never said hello: ignored
    assert store.alive(T0 + 50) == ["d1", "d2"]
    assert store.alive(T0) == ["d1", "d2", "d3"]
    assert store.alive(T0 + 101) == []
    assert store.client.hget(store.prefix + "device:d2", "last_seen") == repr(T0 + 50).encode()


def test_set_masks_only_advance(store: RoundStore) -> None:
    assert store.mask("d1") is None and store.mask_version("d1") == 0
    store.set_masks({"d1": b"\x01\x02", "d2": b"\x05"}, 1)
    assert store.mask("d1") == (b"\x01\x02", 1) and store.mask("d2") == (b"\x05", 1)
    store.set_masks({"d1": b"\x09"}, 1)  # replay of the same version: no-op
    store.set_masks({"d1": b"\x09", "d2": b"\x06"}, 0)
    assert store.mask("d1") == (b"\x01\x02", 1) and store.mask("d2") == (b"\x05", 1)
    store.set_masks({"d1": bytes(range(256))}, 3)  # one device advances, the other keeps its version
    assert store.mask("d1") == (bytes(range(256)), 3) and store.mask_version("d1") == 3
    assert store.mask("d2") == (b"\x05", 1)


# -- rounds -------------------------------------------------------------------------------
def test_open_round_rules(store: RoundStore) -> None:
    assert store.current_round() is None and store.info(1) is None
    open_one(store, 1)
    info = store.info(1)
    assert info is not None and store.current_round() == 1
    assert (info.state, info.quorum, info.sampled, info.received, info.late) == ("open", 2, ["d1", "d2", "d3"], [], [])
    assert (info.opened_at, info.deadline, info.closed_at, info.policy) == (T0, T0 + 60, None, {"quorum": 0.6})
    with pytest.raises(StoreError, match="still open"):
        open_one(store, 2)
    assert store.try_close(1, T0 + 61)
    with pytest.raises(StoreError, match="still closing"):
        open_one(store, 2)
    store.mark_closed(1, T0 + 62)
    for stale in (0, 1):
        with pytest.raises(StoreError, match="current round is 1"):
            open_one(store, stale)
    open_one(store, 5)
    assert store.current_round() == 5
    with pytest.raises(StoreError):
        store.open_round(6, sampled=[], deadline=T0, quorum=1, now=T0)


def ingest(store: RoundStore, r: int, device: str, body: bytes, now: float = T0 + 1) -> str:
    """ingest_update's status, for tests where the closer election does not matter."""
    return store.ingest_update(r, device, body, now)[0]


def test_ingest_update_outcomes(store: RoundStore) -> None:
    assert ingest(store, 1, "d1", b"x") == "unknown_round"
    open_one(store, 1, quorum=3)
    assert ingest(store, 1, "d1", b"body-1") == "stored"
    assert ingest(store, 1, "d1", b"other") == "duplicate"  # a redelivery changes nothing
    assert ingest(store, 1, "d9", b"x") == "not_sampled"
    assert ingest(store, 1, "d2", b"\x00\xff" * 1000) == "stored"
    info = store.info(1)
    assert info is not None and info.received == ["d1", "d2"]
    assert store.updates(1) == {"d1": b"body-1", "d2": b"\x00\xff" * 1000}
    close(store, 1)
    assert ingest(store, 1, "d3", b"late") == "closed"
    assert ingest(store, 1, "d1", b"body-1") == "duplicate"
    assert ingest(store, 1, "d9", b"x") == "not_sampled"
    store.mark_late(1, "d3")
    info = store.info(1)
    assert info is not None and info.late == ["d3"] and info.received == ["d1", "d2"]
    assert set(store.updates(1)) == {"d1", "d2"}


def test_ingest_update_heartbeats_and_elects_the_closer_on_the_quorum(store: RoundStore) -> None:
    enrol(store, "d1", "d2", "d3")
    open_one(store, 1, quorum=2)
    assert store.ingest_update(1, "d1", b"a", T0 + 5) == ("stored", False)
    assert store.ingest_update(1, "d2", b"b", T0 + 6) == ("stored", True)  # the quorum: elected
    assert store.ingest_update(1, "d3", b"c", T0 + 7) == ("closed", False)  # closing: late, nobody elected
    assert store.alive(T0 + 6) == ["d2", "d3"]
    info = store.info(1)
    assert info is not None and info.state == "closing" and info.closing_at == T0 + 6
    assert info.arrivals == {"d1": 5.0, "d2": 6.0}


def test_try_close_not_ready_then_deadline(store: RoundStore) -> None:
    open_one(store, 1, quorum=2, deadline=T0 + 60)
    assert store.ingest_update(1, "d1", b"a", T0 + 1) == ("stored", False)
    assert not store.try_close(1, T0 + 59)
    assert not store.try_close(2, T0 + 1000)  # unknown round
    assert store.try_close(1, T0 + 60)  # deadline passed with 1 of 2
    assert not store.try_close(1, T0 + 61)


def test_try_close_deadline_with_no_updates(store: RoundStore) -> None:
    open_one(store, 1, quorum=3, deadline=T0 + 10)
    assert store.try_close(1, T0 + 11)
    info = store.info(1)
    assert info is not None and info.state == "closing" and info.received == []


def test_try_close_exactly_one_winner(store: RoundStore) -> None:
    open_one(store, 1, quorum=2, deadline=T0 + 60)
    assert ingest(store, 1, "d1", b"a") == "stored"
    assert not store.try_close(1, T0 + 1)
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def racer() -> None:
        barrier.wait()
        won = store.try_close(1, T0 + 60)  # the deadline, with 1 of 2
        with lock:
            results.append(won)

    threads = [threading.Thread(target=racer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == n and results.count(True) == 1


def test_closing_round_is_found_and_mark_closed_is_idempotent(store: RoundStore) -> None:
    open_one(store, 1)
    with pytest.raises(StoreError, match="open"):
        store.mark_closed(1, T0)
    assert store.rounds_in_state("open") == [1]
    assert store.try_close(1, T0 + 100)  # the closer "crashes" here
    assert store.rounds_in_state("closing") == [1] and store.rounds_in_state("open") == []
    store.mark_closed(1, T0 + 200)
    store.mark_closed(1, T0 + 300)
    info = store.info(1)
    assert info is not None and info.state == "closed" and info.closed_at == T0 + 200
    assert store.rounds_in_state("closing") == [] and store.rounds_in_state("closed") == [1]
    open_one(store, 2)
    assert store.rounds_in_state("closed") == [1] and store.rounds_in_state("open") == [2]
    with pytest.raises(StoreError, match="unknown round"):
        store.mark_closed(9, T0)
    with pytest.raises(StoreError):
        store.rounds_in_state("bogus")


def test_carry_update_outcomes(store: RoundStore) -> None:
    open_one(store, 1, sampled=("d1", "d2", "d3"), quorum=3)
    close(store, 1)
    open_one(store, 2, sampled=("d2", "d3"), quorum=3)
    assert store.carry_update(9, "d1", b"late-1", T0 + 1) == "unknown_round"
    assert store.carry_update(2, "d1", b"late-1", T0 + 1) == "carried"
    assert store.carry_update(2, "d1", b"other", T0 + 2) == "duplicate"  # a redelivery changes nothing
    assert store.carry_update(2, "d2", b"late-2", T0 + 2) == "sampled"  # its fresh update supersedes it
    assert ingest(store, 2, "d2", b"fresh-2") == "stored"
    # Membership before duplicates: still "sampled" once the fresh update is in, not a duplicate of it.
    assert store.carry_update(2, "d2", b"late-2", T0 + 3) == "sampled"
    # ...and a carried device's own update for the round is not_sampled, not a duplicate of the carried one.
    assert ingest(store, 2, "d1", b"own-2") == "not_sampled"
    info = store.info(2)
    assert info is not None and info.carried == ["d1"] and info.received == ["d2"]
    assert store.updates(2) == {"d1": b"late-1", "d2": b"fresh-2"}
    close(store, 2)
    assert store.carry_update(2, "d4", b"late-4", T0 + 4) == "closed"


def test_round_keys_share_a_hash_tag(store: RoundStore) -> None:
    open_one(store, 7)
    assert ingest(store, 7, "d1", b"a") == "stored"
    keys = {k.decode() for k in store.client.scan_iter(match=store.prefix + "{r7}:*")}
    assert {store.prefix + "{r7}:" + s for s in ("round", "sampled", "received", "update:d1")} <= keys


def test_counters(store: RoundStore) -> None:
    assert store.counters() == {}
    store.incr("updates:stored")
    store.incr("updates:stored", 2)
    store.incr("rejected:bad_crc")
    assert store.counters() == {"rejected:bad_crc": 1, "updates:stored": 3}


# -- errors -------------------------------------------------------------------------------
def test_unreachable_redis_raises_store_error_without_password() -> None:
    url = "redis://admin:s3cret-pw@127.0.0.1:1/0"
    s = RoundStore.from_url(url)
    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        s.ping()
    assert time.monotonic() - start < 10
    assert "s3cret-pw" not in str(caught.value) and caught.value.__cause__ is None
    with pytest.raises(StoreError):
        s.ingest_update(1, "d1", b"x", T0)
    assert redact_url(url) == "redis://admin:***@127.0.0.1:1/0"


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        RoundStore(redis.Redis(decode_responses=True))
    with pytest.raises(ConfigError):
        RoundStore(redis.Redis(), prefix="fm:{x}:")
    with pytest.raises(ConfigError) as caught:
        RoundStore.from_url("http://u:hunter2@host/0")
    assert "hunter2" not in str(caught.value)
