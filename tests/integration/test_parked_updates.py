"""Parked late updates (the "carry" policy) are moved atomically and every replaced one is counted
(aggregator/store_pending.py, lua/park_update.lua and lua/carry_pending.lua), against real Redis."""

from __future__ import annotations

from aggregator.store import RoundStore

T0 = 1_700_000_000.0


def _open(store: RoundStore, r: int, sampled: list[str]) -> None:
    store.open_round(r, sampled=sampled, deadline=T0 + 60, quorum=len(sampled), now=T0)


def test_a_device_keeps_its_newest_parked_update_and_says_what_it_did(store: RoundStore) -> None:
    assert store.set_pending("d1", 3, b"u3") == "parked"
    assert store.set_pending("d1", 3, b"u3") == "duplicate"  # a redelivery
    assert store.set_pending("d1", 5, b"u5") == "replaced"  # the older one is dropped (counted by the caller)
    assert store.set_pending("d1", 4, b"u4") == "superseded"  # older than the parked one: not kept
    assert store.pending() == [("d1", 5, b"u5")] and store.pending_devices() == {"d1"}


def test_carrying_moves_the_update_into_the_round_and_unparks_it_in_one_step(store: RoundStore) -> None:
    store.set_pending("d1", 1, b"late-1")
    store.set_pending("d2", 1, b"late-2")
    store.set_pending("d3", 0, b"late-3")
    _open(store, 2, ["d2", "d4"])
    assert store.carry_pending(2, "d1", 1, T0 + 1) == ("carried", 1)
    assert store.carry_pending(2, "d2", 1, T0 + 1) == ("sampled", 1)  # its fresh update supersedes it
    assert store.carry_pending(2, "d3", 1, T0 + 1) == ("stale", 0)  # 2 rounds late, max staleness 1
    assert store.carry_pending(2, "d1", 1, T0 + 2) == ("none", -1)  # done once: never carried twice
    assert store.pending() == [] and store.pending_devices() == set()
    info = store.info(2)
    assert info is not None and info.carried == ["d1"] and store.updates(2) == {"d1": b"late-1"}


def test_a_parked_update_survives_until_it_is_carried(store: RoundStore) -> None:
    """The old take_pending deleted first and carried after: a crash in between lost the update. Now
    nothing is deleted until the same script has put it into the round, so reading it changes nothing,
    and a carry into a round that is not open keeps nothing half-done."""
    store.set_pending("d1", 1, b"late-1")
    assert store.pending() == [("d1", 1, b"late-1")] == store.pending()  # reading never removes
    _open(store, 2, ["d2"])
    store.try_close(2, T0 + 61)  # closing before the carry reached it
    assert store.carry_pending(2, "d1", 1, T0 + 62) == ("closed", 1)  # expired, as before: counted by the caller
    assert store.pending() == [] and store.updates(2) == {}
