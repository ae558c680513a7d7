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
from collections.abc import Callable, Sequence

import numpy as np

from aggregator.core_batch import ACK, BatchDecisions, Decision, handle_batch
from aggregator.core_close import publish_round, round_downlinks
from aggregator.round_stats import stats_row
from aggregator.store import RoundInfo, RoundStore, StoreError
from aggregator.store_closer import closer_is_dead_here, default_closer_id
from shared import codec
from shared.bits import pack
from shared.errors import CodecError
from shared.fault_points import FaultPoints, parse_fault
from shared.log_safety import RejectionLog, printable
from shared.merge_rules import MergeContext, get_rule
from shared.models import ModelSpec, build_model
from shared.rounds import (
    DeviceRecord,
    HeldMask,
    RoundState,
    check_hello,
    check_sender,
    check_update,
    mask_message,
    quorum_count,
    refusal,
    sample_count,
    sample_devices,
    undelta_update,
    unpack_update,
)
from shared.structures import structure_rule
from shared.transport import DeviceUnreachable, Envelope, Transport

log = logging.getLogger("fedmask.aggregator")


# What parking a late update counts (store.set_pending's status): "replaced" also drops the older
# parked one, so every late update ends counted as carried, expired, replaced or superseded.
_PARK_COUNTERS = {"parked": "late:parked", "replaced": "late:replaced", "duplicate": "updates:duplicate",
                  "superseded": "late:superseded"}
LATE_POLICIES = ("drop", "carry")

# Fault injection for tests/faults/test_crashes.py: FEDMASK_FAULT=<point>[:<n>] makes the aggregator
# SIGKILL itself the n-th time (default 1) it reaches <point>, so the crash suite can stop it at one exact
# step of the persist/ack and close/publish sequences. Unset (production) it is one attribute test.
FAULT_ENV = "FEDMASK_FAULT"
# FEDMASK_FAULT_ACTION=stop: SIGSTOP instead, so tests/faults/test_redis_kill.py can kill Redis while
# the aggregator stands still at that exact point, then let it go on (SIGCONT).
FAULT_ACTION_ENV = "FEDMASK_FAULT_ACTION"
FAULT_POINTS = (
    "consumed",  # an update was decoded and checked, not yet stored (its delivery is unacked)
    "stored",  # ingest_update has run, the delivery is not acked yet
    "merging",  # the closer was elected and has read the updates; nothing is published
    "published",  # a merged mask was confirmed by the broker; the round's masks are not all stored
    "published_all",  # every merged mask is published and stored; the round is not marked closed
)


def fault_plan(spec: str | None) -> tuple[str, int] | None:
    """Parse FEDMASK_FAULT: None when unset or empty, else (point, n)."""
    return parse_fault(FAULT_ENV, FAULT_POINTS, spec)


class AggregatorCore:
    def __init__(self, store: RoundStore, downlink: Transport, spec: ModelSpec, *, merge: str = "head",
                 prune_last_k: int = 2, prune_rho: float = 0.2, clock: Callable[[], float] = time.time,
                 close_lease_s: float | None = None) -> None:
        net = build_model(spec)
        if close_lease_s is not None:
            store.set_closer(default_closer_id(), close_lease_s)
        self.store, self.downlink, self.clock = store, downlink, clock
        self.fingerprint, self.layout, self.nbits = net.fingerprint(), net.layout_hash(), net.nbits
        self.rule = get_rule(merge)
        self.rule_downlink = getattr(self.rule, "downlink", "bits")
        self.ctx = MergeContext(nbits=self.nbits, pruned_region=pack(net.region_of_last_layers(prune_last_k)))
        self.layer_sizes = [int(np.prod(shape)) for _, shape in net.layout()]
        self._initial = pack(net.mask_bits())  # mask version 0: what a device's first delta is coded against
        self.structures = structure_rule(net, last_k=prune_last_k, rho=prune_rho)  # what a hello may claim
        self._records: dict[str, DeviceRecord] = {}
        self.faults = FaultPoints(FAULT_ENV, FAULT_POINTS, who="aggregator", log=log,  # read once: see FAULT_ENV
                                  sig=signal.SIGSTOP if os.environ.get(FAULT_ACTION_ENV) == "stop" else signal.SIGKILL)
        # One line per reason per window, not per message: a board flooding rejects cannot flood the log.
        self.rejections = RejectionLog(log)

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
            return self._refused(routing_key, err)

    def _refused(self, routing_key: str, err: CodecError) -> Decision:
        """Count and log (rate-limited) a refused delivery; the consumer dead-letters it with the reason."""
        self.store.incr(f"rejected:{err.reason}")
        self.rejections.note(err.reason, f"{printable(routing_key)}: {printable(str(err))}")
        return Decision("reject", err.reason)

    def _hello(self, msg: codec.Message) -> Decision:
        # The simulator's checks (shared.rounds.check_hello); register_device.lua still refuses a
        # changed structure atomically, should two hellos of one device race past this read.
        self._refuse_removed(msg.device)
        check_hello(msg, self.structures, self.store.structure(msg.device))
        assert msg.bits is not None  # check_hello guarantees it
        try:
            self.store.register_device(msg.device, profile="", fingerprint=msg.model, structure=msg.bits,
                                       now=self.clock())
        except StoreError as err:
            if "structure" in str(err):
                raise CodecError("structure_changed", str(err)) from err
            raise
        self._records.pop(msg.device, None)  # a re-enrolled id (after `devices remove`) has a new structure
        self.store.touch(msg.device, self.clock())
        log.info("device %s enrolled (%d structure bits)", msg.device, int(np.unpackbits(
            np.frombuffer(msg.bits, np.uint8), count=self.nbits).sum()))
        if self.store.clear_unreachable(msg.device):
            self._send_newest_mask(msg.device)
        return ACK

    def _refuse_removed(self, device: str) -> None:
        if self.store.is_removed(device):
            raise CodecError("device_removed", f"device {device} was removed by an operator; enrol it again to "
                             "bring it back")

    def _send_newest_mask(self, device: str) -> None:
        """A board back after being unreachable gets the newest mask it missed (if any): the same
        message its close would have sent, rebuilt from what Redis kept."""
        stored = self.store.mask(device)
        rec = self._record(device)
        if stored is None or rec is None:
            return
        packed, version = stored
        if self.rule_downlink == "q4":
            msg = codec.make_mask(device=device, round=version, model=self.fingerprint, layout=self.layout,
                                  bits=packed, nbits=rec.inside, version=version, enc="q4")
        else:
            msg = mask_message(device, np.frombuffer(packed, np.uint8), rec, round_id=version,
                               fingerprint=self.fingerprint, layout=self.layout, nbits=self.nbits)
        if self._send(device, codec.encode(msg)):
            self.store.incr("downlink:resent")
            log.info("device %s is back: sent its newest mask (v%d)", device, version)

    def _send(self, device: str, body: bytes) -> bool:
        """Publish one downlink; a board whose queue is gone is marked unreachable (counted once) and
        the caller goes on: one broken board must never block a round."""
        try:
            self.downlink.publish_downlink(device, body)
            return True
        except DeviceUnreachable as err:
            self._unreachable(device, err)
            return False

    def _unreachable(self, device: str, err: DeviceUnreachable) -> None:
        if self.store.mark_unreachable(device, self.clock()):
            self.store.incr("devices:unreachable")
        log.warning("%s; it is not sampled until it says hello again", err)

    def _update(self, msg: codec.Message, body: bytes) -> Decision:
        self._refuse_removed(msg.device)
        rec = check_update(msg, self._record(msg.device))  # length and structure checks; no 1M-bit scatter here
        if msg.enc == "delta":
            msg = self.undelta(msg, rec)
            body = codec.encode(msg)
        self._fault("consumed")
        now = self.clock()
        # One round trip stores, heartbeats and runs the closer election (quorum met, or deadline).
        status, elected = self.store.ingest_update(msg.round, msg.device, body, now)
        self._fault("stored")
        if status == "stored":
            # The board is free again; its training statistics join the round's (aggregator/round_stats.py).
            self.store.note_update(msg.device, msg.round, "updates:stored", stats=stats_row(msg.stats))
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
                # Counted again when it is carried or expires; a device keeps only its newest parked update.
                parked = self.store.set_pending(msg.device, msg.round, body)
                self.store.incr(_PARK_COUNTERS[parked])
                if parked == "replaced":
                    self.store.incr("late:parked")
                return ACK
        self.store.incr("late:dropped")
        raise CodecError("round_closed", f"round {msg.round} closed before {msg.device}'s update "
                         f"(late policy {policy.get('late', 'drop')}, max staleness {max_staleness})")

    def handle_batch(self, items: Sequence[tuple[str, str | None, bytes]]) -> BatchDecisions:
        """Validate and persist a prefetch window in one Redis round trip (aggregator/core_batch.py);
        persist-before-ack per message, as in `handle`. The elected rounds are left to the caller."""
        return handle_batch(self, items)

    def undelta(self, msg: codec.Message, rec: DeviceRecord) -> codec.Message:
        """A delta-coded update decoded at ingest, against the mask its base names: Redis keeps the raw
        update, so the close, carried and parked updates and a resumed close never depend on a base again."""
        return undelta_update(msg, rec, self.nbits, self._held(msg.device))

    def _held(self, device: str) -> HeldMask:
        """A device's merged masks a delta-coded update may be coded against: version 0 (the initial
        mask), the newest and the one before it (a redelivery after a close is coded against that). Under
        the agreement rule Redis keeps theta levels, not bits: no base, so deltas are stale_base."""
        def held(version: int) -> np.ndarray | None:
            if self.rule_downlink == "q4":
                return None
            if version == 0:
                return self._initial
            packed = self.store.held_masks(device).get(version)
            return np.frombuffer(packed, np.uint8) if packed is not None and len(packed) == len(self._initial) \
                else None
        return held

    def _record(self, device: str) -> DeviceRecord | None:
        rec = self._records.get(device)
        if rec is None:
            structure = self.store.structure(device)
            return None if structure is None else self._record_from(device, structure)
        return rec

    def _record_from(self, device: str, structure: bytes) -> DeviceRecord:
        rec = self._records[device] = DeviceRecord(np.frombuffer(structure, np.uint8).copy())
        # The positions every close selects and scatters by, computed here (the board's first update)
        # rather than in the first close, where 1,000 of them at once took 30 of its 60 s (issue 14).
        rec.spans(self.nbits)
        return rec

    def _fault(self, point: str) -> None:
        """SIGKILL (or SIGSTOP) this process if FEDMASK_FAULT names `point` and this is its n-th hit."""
        self.faults.hit(point)

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
        target, sampled = self.sample_round(r, candidates, rate=rate, devices=devices, over_select=over_select,
                                            seed=seed, late=late, max_staleness=max_staleness)
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
            self._send(d, codec.encode(task))  # an unreachable board just does not answer: the quorum decides
        info = self.store.info(r)
        assert info is not None
        log.info("round %d open: %d sampled, quorum %d, deadline in %.0fs, %d late updates carried in",
                 r, len(sampled), info.quorum, deadline_s, len(info.carried))
        return info

    def sample_round(self, r: int, candidates: list[str] | None, *, rate: float | None, devices: int | None,
                     over_select: float, seed: int, late: str, max_staleness: int) -> tuple[int, list[str]]:
        """(target count, sampled devices) of round `r`: idle, reachable enrolled devices (or exactly
        `candidates`), sampled as the simulator samples. Every kind of round opens with this."""
        pool = candidates if candidates is not None else self.store.device_ids()
        if not pool:
            raise StoreError("no enrolled devices: start workers (they say hello) before a round")
        if candidates is None:
            # Under "carry" a parked update joins this round, so its device sits this one out.
            parked = self.store.pending_devices() if late == "carry" else set()
            pool = sorted(set(pool) - self.store.busy(pool, r, max_staleness) - parked - self.store.unreachable())
            if not pool:
                raise StoreError(f"every enrolled device is busy with an earlier task or unreachable (round {r})")
        target = sample_count(len(pool), rate=rate, devices=devices)
        return target, sample_devices(pool, sample_count(len(pool), rate=rate, devices=devices,
                                                         over_select=over_select), seed=seed, round_id=r)

    def _carry_parked(self, round_id: int, max_staleness: int, now: float) -> None:
        """Move every parked late update into the new round, each in one atomic step (a crash never
        loses one nor carries it twice); too stale ones, or of a device sampled afresh, expire."""
        for device, _, _ in self.store.pending():
            status, late_round = self.store.carry_pending(round_id, device, max_staleness, now)
            if status == "none":
                continue
            if status in ("carried", "duplicate"):
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
        """Called periodically: closes the current round once its deadline passes, and finishes the
        close of a round whose closer died (another aggregator on the same queue: its lease lapsed).
        Only the current round can be closing: a round opens only after the previous one closed."""
        r = self.store.current_round()
        if r is not None:
            info = self.store.info(r)
            if info is not None and info.state == "open":
                self.maybe_close(r)
            elif info is not None and info.state == "closing" and self._take_over(r):
                log.warning("round %d: its closer is gone; taking over the close", r)
                self.store.incr("rounds:taken_over")
                self.close(r)

    def _take_over(self, round_id: int) -> bool:
        """True if this process may finish a closing round: its closer's lease lapsed (claimed now), or
        the closer was a process of this host that no longer runs (a crash restarted by systemd need
        not wait out its own lease)."""
        if self.store.claim_close(round_id):
            return True
        owner = self.store.closer_of(round_id)
        if owner is not None and owner == (self.store.closer_id or default_closer_id()):
            # Our own close, cut short by an outage (Redis killed mid-close): resume runs under the
            # service lock, so no close of ours is still going; waiting out our own lease would stall it.
            self.store.renew_close(round_id)
            return True
        if owner is None or not closer_is_dead_here(owner):
            return False
        self.store.renew_close(round_id)
        return True

    def resume(self) -> list[int]:
        """Finish rounds a crashed closer left in 'closing' (publishing again is idempotent), unless
        another live aggregator holds the close (several may share the queue: store_closer.py)."""
        done = []
        for r in self.store.rounds_in_state("closing"):
            if not self._take_over(r):
                log.info("round %d is being closed by %s", r, self.store.closer_of(r))
                continue
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
            if rec is None:  # removed while closing, and this process (resuming the close) never cached it
                log.warning("round %d: %s was removed while closing: its update is not merged", round_id, device)
                continue
            rnd.received[device] = unpack_update(msg, rec, self.nbits)
            if msg.downlink == "delta":
                rnd.delta_downlink[device] = msg.round
        self._fault("merging")
        messages, stored = round_downlinks(self, rnd)
        publish_round(self, rnd, messages)  # kept in Redis either way (set_masks below)
        # After the publishes, in one round trip: a crash before this is resumed by publishing again.
        self.store.set_masks(stored, round_id)
        self._fault("published_all")
        if self.store.mark_closed(round_id, self.clock()):  # a resumed close racing the first counts once
            self.store.incr("rounds:closed")
        log.info("round %d closed: %d participants merged (%s)", round_id, len(messages), self.rule.name)
        return messages
