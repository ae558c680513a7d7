"""The aggregator's round logic over a RoundStore and a downlink Transport.

No pika and no threads here: the AMQP consumer calls `handle` for each delivery and acts on the
returned (action, reason). Every decision reuses shared/ (codec, rounds, merge rules), so the
pipeline merges exactly as the simulator does.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aggregator.store import RoundInfo, RoundStore, StoreError
from shared import codec
from shared.bits import pack, scatter_at
from shared.errors import CodecError, ConfigError
from shared.merge_rules import MergeContext, get_rule
from shared.models import ModelSpec, build_model
from shared.rounds import (
    DeviceRecord,
    RoundState,
    check_hello,
    check_sender,
    check_update,
    downlink_messages,
    quorum_count,
    refusal,
    sample_count,
    sample_devices,
    unpack_update,
)
from shared.structures import structure_rule
from shared.transport import Envelope, Transport

log = logging.getLogger("fedmask.aggregator")


@dataclass(frozen=True)
class Decision:
    """What the consumer does with a delivery: ack, or reject to dead.letters with a reason."""

    action: str  # "ack" | "reject"
    reason: str = ""


ACK = Decision("ack")
LATE_POLICIES = ("drop", "carry")

# Fault injection for tests/faults/test_crashes.py: FEDMASK_FAULT=<point>[:<n>] makes the aggregator
# SIGKILL itself the n-th time (default 1) it reaches <point>, so the crash suite can stop it at one exact
# step of the persist/ack and close/publish sequences. Unset (production) it is one attribute test.
FAULT_ENV = "FEDMASK_FAULT"
FAULT_POINTS = (
    "consumed",  # an update was decoded and checked, not yet stored (its delivery is unacked)
    "stored",  # ingest_update has run, the delivery is not acked yet
    "merging",  # the closer was elected and has read the updates; nothing is published
    "published",  # a merged mask was confirmed by the broker; the round's masks are not all stored
    "published_all",  # every merged mask is published and stored; the round is not marked closed
)


def fault_plan(spec: str | None) -> tuple[str, int] | None:
    """Parse FEDMASK_FAULT: None when unset or empty, else (point, n)."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    count = count or "1"
    if point not in FAULT_POINTS or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{FAULT_ENV} must be <point>[:<n>] with n >= 1 and point one of "
                          f"{', '.join(FAULT_POINTS)}; got {spec!r}")
    return point, int(count)


class AggregatorCore:
    def __init__(self, store: RoundStore, downlink: Transport, spec: ModelSpec, *, merge: str = "head",
                 prune_last_k: int = 2, prune_rho: float = 0.2, clock: Callable[[], float] = time.time) -> None:
        net = build_model(spec)
        self.store, self.downlink, self.clock = store, downlink, clock
        self.fingerprint, self.layout, self.nbits = net.fingerprint(), net.layout_hash(), net.nbits
        self.rule = get_rule(merge)
        self.ctx = MergeContext(nbits=self.nbits, pruned_region=pack(net.region_of_last_layers(prune_last_k)))
        self.structures = structure_rule(net, last_k=prune_last_k, rho=prune_rho)  # what a hello may claim
        self._records: dict[str, DeviceRecord] = {}
        self._fault_plan = fault_plan(os.environ.get(FAULT_ENV))  # read once: see FAULT_ENV
        self._fault_hits = 0

    # -- uplink -------------------------------------------------------------------------
    def handle(self, routing_key: str, user_id: str | None, body: bytes) -> Decision:
        """Validate and persist one uplink message. Persist-before-ack: `ack` is returned only once
        Redis holds the update (or already held it: a redelivery is a no-op)."""
        try:
            msg = codec.decode(body)
            env = Envelope(routing_key, user_id or "", body)
            check_sender(env, msg, fingerprint=self.fingerprint, layout=self.layout)
            if msg.type == "hello":
                return self._hello(msg)
            if msg.type == "update":
                return self._update(msg, body)
            raise CodecError("wrong_type", f"devices may send hello or update, not {msg.type}")
        except CodecError as err:
            self.store.incr(f"rejected:{err.reason}")
            log.warning("rejected %s: %s", routing_key, err)
            return Decision("reject", err.reason)

    def _hello(self, msg: codec.Message) -> Decision:
        # The simulator's checks (shared.rounds.check_hello); register_device.lua still refuses a
        # changed structure atomically, should two hellos of one device race past this read.
        check_hello(msg, self.structures, self.store.structure(msg.device))
        assert msg.bits is not None  # check_hello guarantees it
        try:
            self.store.register_device(msg.device, profile="", fingerprint=msg.model, structure=msg.bits,
                                       now=self.clock())
        except StoreError as err:
            if "structure" in str(err):
                raise CodecError("structure_changed", str(err)) from err
            raise
        self.store.touch(msg.device, self.clock())
        log.info("device %s enrolled (%d structure bits)", msg.device, int(np.unpackbits(
            np.frombuffer(msg.bits, np.uint8), count=self.nbits).sum()))
        return ACK

    def _update(self, msg: codec.Message, body: bytes) -> Decision:
        check_update(msg, self._record(msg.device))  # length and structure checks; no 1M-bit scatter here
        self._fault("consumed")
        now = self.clock()
        # One round trip stores, heartbeats and runs the closer election (quorum met, or deadline).
        status, elected = self.store.ingest_update(msg.round, msg.device, body, now)
        self._fault("stored")
        if status == "stored":
            self.store.note_update(msg.device, msg.round, "updates:stored")  # the board is free again
            if elected:
                self.close(msg.round)
            return ACK
        if elected:  # the deadline passed while this (duplicate or refused) update was in flight
            self.close(msg.round)
        if status == "duplicate":
            # Also mark it reported: an aggregator killed between storing and this line left the device
            # looking busy, and only the redelivery can clear that.
            self.store.note_update(msg.device, msg.round, "updates:duplicate")
            return ACK  # already persisted: acknowledging the redelivery is the idempotent outcome
        if status == "closed":
            self.store.mark_reported(msg.device, msg.round)
            return self._late(msg, body, now)
        raise refusal(status, msg)  # not_sampled or unknown_round

    def _late(self, msg: codec.Message, body: bytes, now: float) -> Decision:
        """An update for a round that already closed, handled by the newest round's late policy:
        "drop" rejects it (counted, and listed in the round's late set); "carry" merges it into the
        next round if that is at most `max_staleness` rounds later: at once when a newer round is
        open, else parked until one opens (start_round picks it up)."""
        self.store.mark_late(msg.round, msg.device)
        current = self.store.current_round() or msg.round
        info = self.store.info(current)
        policy = info.policy if info is not None else {}
        max_staleness = int(str(policy.get("max_staleness", 0)))
        if policy.get("late") == "carry" and current - msg.round <= max_staleness:
            if current > msg.round and info is not None and info.state == "open":
                status = self.store.carry_update(current, msg.device, body, now)
                if status in ("carried", "duplicate"):
                    self.store.incr("late:carried" if status == "carried" else "updates:duplicate")
                    log.info("late update of %s from round %d carried into round %d", msg.device, msg.round, current)
                    return ACK
            elif current - msg.round < max_staleness:  # the next round can still take it
                self.store.set_pending(msg.device, msg.round, body)  # counted when it is carried or expires
                return ACK
        self.store.incr("late:dropped")
        raise CodecError("round_closed", f"round {msg.round} closed before {msg.device}'s update "
                         f"(late policy {policy.get('late', 'drop')}, max staleness {max_staleness})")

    def _record(self, device: str) -> DeviceRecord | None:
        rec = self._records.get(device)
        if rec is None:
            structure = self.store.structure(device)
            if structure is None:
                return None
            rec = self._records[device] = DeviceRecord(np.frombuffer(structure, np.uint8).copy())
        return rec

    def _fault(self, point: str) -> None:
        """SIGKILL this process if FEDMASK_FAULT names `point` and this is its n-th hit (see FAULT_ENV)."""
        if self._fault_plan is None or self._fault_plan[0] != point:
            return
        self._fault_hits += 1
        if self._fault_hits == self._fault_plan[1]:
            log.warning("%s=%s:%d reached: killing the aggregator (SIGKILL)", FAULT_ENV, point, self._fault_hits)
            os.kill(os.getpid(), signal.SIGKILL)

    # -- rounds -------------------------------------------------------------------------
    def start_round(self, *, rate: float | None = None, devices: int | None = None, quorum: float = 1.0,
                    deadline_s: float = 600.0, over_select: float = 1.0, seed: int = 0,
                    candidates: list[str] | None = None, late: str = "drop", max_staleness: int = 2,
                    min_wait: float = 0.0) -> RoundInfo:
        """Sample idle devices, open the round in Redis, carry parked late updates into it, then send
        every sampled device its task (a device whose late update is carried in gets its merged mask).

        A device still training an earlier task (tasked, not answered, within `max_staleness` rounds)
        is not sampled: a board trains one task at a time, so a second task would only queue behind
        the first and arrive late as well.

        `min_wait` > 0: the quorum closes the round no earlier than `min_wait` seconds after it opened
        (close_round.lua), so with over-selection every board that answers within it is merged and the
        fastest boards alone cannot fill the quorum (shared.rounds.quorum_members is the rule, pure)."""
        if late not in LATE_POLICIES:
            raise StoreError(f"late policy must be one of {', '.join(LATE_POLICIES)}, got {late!r}")
        if max_staleness < 0:
            raise StoreError(f"max_staleness must be >= 0, got {max_staleness}")
        if not 0 <= min_wait <= deadline_s:
            raise StoreError(f"min_wait must be in [0, deadline] = [0, {deadline_s:g}] s, got {min_wait:g}")
        r = (self.store.current_round() or 0) + 1
        pool = candidates if candidates is not None else self.store.device_ids()
        if not pool:
            raise StoreError("no enrolled devices: start workers (they say hello) before a round")
        if candidates is None:
            # Under "carry" a parked update joins this round, so its device sits this one out.
            parked = self.store.pending_devices() if late == "carry" else set()
            pool = sorted(set(pool) - self.store.busy(pool, r, max_staleness) - parked)
            if not pool:
                raise StoreError(f"every enrolled device is still busy with an earlier task (round {r})")
        target = sample_count(len(pool), rate=rate, devices=devices)
        sampled = sample_devices(pool, sample_count(len(pool), rate=rate, devices=devices,
                                                    over_select=over_select), seed=seed, round_id=r)
        now = self.clock()
        policy: dict[str, object] = {"quorum": quorum, "over_select": over_select, "seed": seed, "late": late,
                                     "max_staleness": max_staleness}
        if min_wait:  # only when set: a round without it reads as before
            policy["min_wait"] = min_wait
        self.store.open_round(r, sampled=sampled, deadline=now + deadline_s, quorum=quorum_count(target, quorum),
                              now=now, policy=policy)
        self.store.mark_tasked(sampled, r)
        self._carry_parked(r, max_staleness if late == "carry" else -1, now)
        for d in sampled:
            task = codec.make_task(device=d, round=r, model=self.fingerprint, layout=self.layout, bits=b"",
                                   nbits=0, version=self.store.mask_version(d), deadline=now + deadline_s)
            self.downlink.publish_downlink(d, codec.encode(task))
        info = self.store.info(r)
        assert info is not None
        log.info("round %d open: %d sampled, quorum %d, deadline in %.0fs, %d late updates carried in",
                 r, len(sampled), info.quorum, deadline_s, len(info.carried))
        return info

    def _carry_parked(self, round_id: int, max_staleness: int, now: float) -> None:
        for device, late_round, body in self.store.take_pending():
            if round_id - late_round <= max_staleness and \
                    self.store.carry_update(round_id, device, body, now) in ("carried", "duplicate"):
                self.store.incr("late:carried")
                continue
            self.store.incr("late:expired")  # too stale by now, or the device was sampled afresh
            log.info("parked update of %s from round %d dropped at round %d", device, late_round, round_id)

    def maybe_close(self, round_id: int) -> bool:
        """Close if quorum or deadline says so; the Lua script lets exactly one caller win."""
        if not self.store.try_close(round_id, self.clock()):
            return False
        self.close(round_id)
        return True

    def tick(self) -> None:
        """Called periodically: closes the current round once its deadline passes."""
        r = self.store.current_round()
        if r is not None:
            info = self.store.info(r)
            if info is not None and info.state == "open":
                self.maybe_close(r)

    def resume(self) -> list[int]:
        """Finish rounds a crashed closer left in 'closing' (publishing again is idempotent)."""
        done = []
        for r in self.store.rounds_in_state("closing"):
            log.warning("resuming the close of round %d", r)
            self.close(r)
            done.append(r)
        return done

    def close(self, round_id: int) -> dict[str, codec.Message]:
        """Merge the stored updates, publish each participant's downlink (confirmed), then mark closed.

        The downlink comes from shared.rounds.downlink_messages, as in the simulator: merged bits for a
        bit rule, agreement levels (enc "q4") for the agreement rule."""
        rnd = RoundState(round_id=round_id, sampled=[], deadline=0.0, quorum=0, state="closing")
        for device, body in self.store.updates(round_id).items():
            msg = codec.decode(body, expect_type="update")
            rec = self._record(device)
            rnd.received[device] = unpack_update(msg, rec, self.nbits)
        self._fault("merging")
        messages = downlink_messages(self.rule, self.ctx, rnd, self._records, fingerprint=self.fingerprint,
                                     layout=self.layout)
        for device, msg in messages.items():
            self.downlink.publish_downlink(device, codec.encode(msg))
            self._fault("published")
        # After the publishes, in one round trip: a crash before this is resumed by publishing again.
        self.store.set_masks({d: self._stored_mask(msg) for d, msg in messages.items()}, round_id)
        self._fault("published_all")
        self.store.mark_closed(round_id, self.clock())
        self.store.incr("rounds:closed")
        log.info("round %d closed: %d participants merged (%s)", round_id, len(messages), self.rule.name)
        return messages

    def _stored_mask(self, msg: codec.Message) -> bytes:
        """What Redis keeps as the device's mask: for a bit rule the packed full merged mask (the
        published bits scattered back: a rule never sets a bit outside the structure); for the
        agreement rule the q4 levels as published (inside the structure, two per byte)."""
        assert msg.bits is not None  # every downlink carries bits
        if msg.enc == "q4":
            return msg.bits
        inside = np.frombuffer(msg.bits, dtype=np.uint8)
        return scatter_at(inside, self._records[msg.device].where(self.nbits), self.nbits).tobytes()
