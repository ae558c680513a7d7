"""Which rhythm serves a mixed fleet: an event-driven simulator on a virtual clock (issue 13).

Three modes, all merging with the pipeline's own functions:
- "sync": sync-all. Every board is tasked each round; the round closes when all answered (quorum 1.0).
- "quorum": today's pipeline default (the demo's settings): each round samples the idle boards (rate
  1.0; a board still on an earlier task within `max_staleness` rounds is busy, aggregator/core.py
  start_round), closes at ceil(quorum x sampled) stored updates or its deadline, and a late update is
  carried into the open round if at most `max_staleness` rounds late (not counted for its quorum),
  parked if no newer round is open yet, else dropped (AggregatorCore._late, carry_pending.lua).
  The next round opens `open_gap_s` after a close (the operator's poll, ops/control/rounds.py).
- "async": buffered asynchronous (shared/async_buffer.py): a board gets its next task as soon as its
  update is stored; every K stored updates the buffer merges and sends each buffered board its mask.
Rounds merge with shared.rounds.merge_round (what AggregatorCore.close runs via downlink_messages);
async with AsyncBuffer.flush, which calls the same rule's merge when the staleness weight is constant.
Under the agreement rule a merge sends theta (float32, all elements) instead of a mask, as the pipeline
sends it as q4 levels: over the round's updates (AgreementRule.theta, as downlink_messages), or the
flush's (Flush.theta). Only a learner whose devices take that downlink runs it (`downlink == "q4"`: the
torch learner with an agreement variant's config); the vector learner adopts bits only.

Time is simulated (shared/sim/clock.py); a board's durations come from shared/sim/rhythm_fleet.py.
Training happens in the learner (shared/sim/vector_learner.py, or shared/sim/torch_learner.py for the
project's real DeviceRuntime), lazily and in batches, with the result of running it at each event.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.async_buffer import AsyncBuffer, check_weighting
from shared.merge_rules import AgreementRule, MergeContext, get_rule
from shared.rounds import DeviceRecord, RoundState, merge_round, quorum_count, sample_count, sample_devices
from shared.sim.clock import Event, EventQueue
from shared.sim.rhythm_fleet import Durations, FleetTiming, LazyFleet, Learner

MODES = ("sync", "quorum", "async")
UPDATE_HEADER_BYTES = 120  # a codec update's envelope without its bits (msgpack header, ids, stats)
MASK_HEADER_BYTES = 90
TASK_BYTES = 110


@dataclass(frozen=True)
class RhythmConfig:
    mode: str
    merges: int = 100  # rounds closed (sync, quorum) or buffer flushes (async) before no more tasks go out
    horizon_s: float = math.inf  # the clock stops here
    rule: str = "paper"
    quorum: float = 0.7
    rate: float = 1.0
    late: str = "carry"
    max_staleness: int = 10  # quorum: rounds; async: merges (the bound on the other boards' masks)
    deadline_s: float = 300.0
    open_gap_s: float = 0.1
    k: int = 1
    staleness: str = "constant"
    eval_times: tuple[float, ...] = ()
    seed: int = 0
    record: bool = False  # keep the aggregator's arrival order (for replays and tests)
    eval_after_merge: bool = False  # also evaluate once each merge's masks have arrived (rounds modes)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class _Round:
    sampled: set[str]
    quorum: int
    members: dict[str, str] = field(default_factory=dict)  # device -> uid (stored or carried)
    own: int = 0
    state: str = "open"


@dataclass
class RhythmResult:
    mode: str
    curve: list[dict[str, float]]
    final_accuracy: dict[str, float]
    per_device: dict[str, dict[str, int]]
    counters: dict[str, int]
    bytes_up: int
    bytes_down: int
    sim_seconds: float
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time: on a shared machine, wall time is mostly other work's
    merges: int
    trained: int
    arrivals: list[tuple[float, str, str, int, int]]  # (time, device, uid, base version, round)
    masks: dict[str, np.ndarray]  # each board's newest merged mask (packed full; agreement: theta), as sent
    still_parked: int = 0  # quorum: late updates parked when the run ended (no round left to carry them)
    update_bits: dict[str, np.ndarray] = field(default_factory=dict)  # uid -> the update (record only)


class _Sim:
    def __init__(self, learner: Learner, timing: FleetTiming, cfg: RhythmConfig) -> None:
        self.learner, self.timing, self.cfg = learner, timing, cfg
        if cfg.mode == "sync":  # quorum 1.0, every board every round, no late update possible
            self.cfg = cfg = RhythmConfig(**{**cfg.__dict__, "quorum": 1.0, "late": "drop", "deadline_s": math.inf})
        self.q, self.fleet, self.dur = EventQueue(), LazyFleet(learner), Durations(timing)
        self.rule = get_rule(cfg.rule)
        self.agreement = isinstance(self.rule, AgreementRule)
        if self.agreement != (learner.downlink == "q4"):
            raise ValueError(f"rule {cfg.rule!r} and a learner whose devices take {learner.downlink}: the agreement "
                             "rule needs the torch learner with an agreement variant (fedmask-agree), a bit rule bits")
        self.ids = learner.device_ids()
        self.structures = learner.structures()
        self.records = {d: DeviceRecord(self.structures[d]) for d in self.ids}
        inside = {d: int(np.unpackbits(s).sum()) for d, s in self.structures.items()}
        self.up_bytes = {d: UPDATE_HEADER_BYTES + (n + 7) // 8 for d, n in inside.items()}
        per_byte = 2 if self.agreement else 8  # q4: two levels a byte
        self.mask_bytes = {d: MASK_HEADER_BYTES + (n + per_byte - 1) // per_byte for d, n in inside.items()}
        self.busy = dict.fromkeys(self.ids, False)
        self.done = dict.fromkeys(self.ids, 0)
        self.version = dict.fromkeys(self.ids, 0)
        self.inbox: dict[str, list[tuple[int, np.ndarray]]] = {d: [] for d in self.ids}
        self.tasks: dict[str, deque[int]] = {d: deque() for d in self.ids}
        self.stats = {d: Counter[str]() for d in self.ids}
        self.counters: Counter[str] = Counter()
        self.bytes_up = self.bytes_down = 0
        self.merges = 0
        self.stopping = False
        self.arrivals: list[tuple[float, str, str, int, int]] = []
        self.sent_masks: dict[str, np.ndarray] = {}
        self.curve: list[dict[str, float]] = []
        # rounds
        self.rounds: dict[int, _Round] = {}
        self.current = 0
        self.tasked = dict.fromkeys(self.ids, 0)
        self.reported = dict.fromkeys(self.ids, 0)
        self.parked: dict[str, tuple[int, str]] = {}
        # async
        self.buffer = AsyncBuffer(cfg.k, cfg.max_staleness, cfg.staleness)
        if cfg.mode == "async":
            check_weighting(self.rule, cfg.staleness)
        self.uid_of: dict[str, str] = {}
        self.update_bits: dict[str, np.ndarray] = {}

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> RhythmResult:
        start, cpu = time.perf_counter(), time.process_time()
        if self.cfg.mode == "async":
            for d in self.ids:
                self._send_task(d, 0)
        else:
            self.q.at(0.0, "open")
        handlers = {"task": self._on_task, "done": self._on_done, "up": self._on_up, "mask": self._on_mask,
                    "open": self._on_open, "deadline": self._on_deadline, "eval": self._on_eval}
        evals = sorted(t for t in self.cfg.eval_times if t <= self.cfg.horizon_s)
        end, horizon = 0.0, self.cfg.horizon_s
        while self.q and self.q.peek_time() <= horizon:
            while evals and evals[0] <= self.q.peek_time():  # the state at that instant
                self._eval(evals.pop(0))
            ev = self.q.pop()
            end = ev.time
            handlers[ev.kind](ev)
            if not self.q and self.cfg.mode == "async" and self.buffer.buffer:
                self._flush()  # the arrivals ran out: drain the partial buffer (its masks still go out)
        if self.q:  # stopped by the horizon
            end = horizon
        for t in evals:  # nothing changes after the last event: only the points up to the end
            if t <= end:
                self._eval(t)
        if not self.curve or self.curve[-1]["t"] < end:
            self._eval(end)
        self.fleet.run()
        return RhythmResult(
            mode=self.cfg.mode, curve=self.curve, still_parked=len(self.parked),
            final_accuracy=self.learner.accuracy("test"),
            per_device={d: dict(c) for d, c in self.stats.items()}, counters=dict(self.counters + self.buffer.counts),
            bytes_up=self.bytes_up, bytes_down=self.bytes_down, sim_seconds=end,
            wall_seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu, merges=self.merges,
            trained=self.fleet.trained,
            arrivals=self.arrivals, masks=self.sent_masks, update_bits=self.update_bits)

    # -- the boards ----------------------------------------------------------------------
    def _send_task(self, d: str, round_id: int) -> None:
        self.bytes_down += TASK_BYTES
        self.q.after(self.timing.message_s(TASK_BYTES), "task", d, round_id)

    def _on_task(self, ev: Event) -> None:
        if self.busy[ev.device]:
            self.tasks[ev.device].append(ev.data)
        else:
            self._start(ev.device, ev.data)

    def _start(self, d: str, round_id: int) -> None:
        self.busy[d] = True
        self.q.after(self.dur(d, self.done[d]), "done", d, (round_id, self.version[d]))

    def _on_done(self, ev: Event) -> None:
        d, (round_id, base) = ev.device, ev.data
        uid = f"{d}#{self.done[d]}"
        self.done[d] += 1
        self.fleet.train(d, uid, round_id if self.cfg.mode != "async" else self.done[d])
        self.busy[d] = False
        for v, m in sorted(self.inbox[d], key=lambda vm: vm[0]):  # masks that came in while it trained
            if v > self.version[d]:
                self._adopt(d, v, m)
        self.inbox[d] = []
        self.stats[d]["sent"] += 1
        self.bytes_up += self.up_bytes[d]
        self.q.after(self.timing.message_s(self.up_bytes[d]), "up", d, (round_id, base, uid))
        if self.tasks[d]:
            self._start(d, self.tasks[d].popleft())

    def _on_mask(self, ev: Event) -> None:
        d, (v, m) = ev.device, ev.data
        if v <= self.version[d]:
            self.counters["masks:stale"] += 1
            return
        self.stats[d]["masks"] += 1  # received (adopted now, or after the task it is training)
        if self.busy[d]:
            self.inbox[d].append((v, m))
        else:
            self._adopt(d, v, m)

    def _adopt(self, d: str, v: int, m: np.ndarray) -> None:
        self.fleet.apply(d, m, v)
        self.version[d] = v

    def _send_mask(self, d: str, version: int, mask: np.ndarray) -> None:
        self.sent_masks[d] = mask
        self.bytes_down += self.mask_bytes[d]
        self.q.after(self.timing.message_s(self.mask_bytes[d]), "mask", d, (version, mask))

    def _on_eval(self, ev: Event) -> None:
        self._eval(ev.time)

    def _eval(self, t: float) -> None:
        self.fleet.run()
        acc = self.learner.accuracy("test")
        point = {"t": t, "accuracy": float(np.mean(list(acc.values()))), "merges": self.merges,
                 "updates": sum(c["sent"] for c in self.stats.values())}
        for prof in sorted(set(self.timing.profiles.values())):
            vals = [a for d, a in acc.items() if self.timing.profiles[d] == prof]
            point[f"accuracy_{prof}"] = float(np.mean(vals)) if vals else math.nan
        self.curve.append(point)

    # -- the aggregator: rounds ----------------------------------------------------------
    def _on_up(self, ev: Event) -> None:
        d, (r, base, uid) = ev.device, ev.data
        if self.cfg.record:
            self.arrivals.append((ev.time, d, uid, base, r))
        if self.cfg.mode == "async":
            self._async_up(d, base, uid)
            return
        self.reported[d] = max(self.reported[d], r)
        rnd = self.rounds.get(r)
        # admit_update's order (shared/rounds.py, admit_update.lua): membership, duplicate, state.
        if rnd is None or d not in rnd.sampled:
            self.counters["updates:not_sampled"] += 1
            return
        if d in rnd.members:
            self.counters["updates:duplicate"] += 1
            return
        if rnd.state != "open":
            self._late(d, r, uid)
            return
        rnd.members[d] = uid
        rnd.own += 1
        self.counters["updates:stored"] += 1
        if rnd.own >= rnd.quorum:
            self._close(r)

    def _late(self, d: str, r: int, uid: str) -> None:
        """AggregatorCore._late under the carry policy (drop: always dropped)."""
        c = self.current
        cur = self.rounds[c]
        if self.cfg.late == "carry" and c - r <= self.cfg.max_staleness:
            if c > r and cur.state == "open":
                if d in cur.sampled:  # carry_update.lua "sampled": its fresh task supersedes it
                    self.counters["late:dropped"] += 1
                elif d not in cur.members:
                    cur.members[d] = uid
                    self.counters["late:carried"] += 1
                return
            if c - r < self.cfg.max_staleness:
                if d in self.parked:
                    self.counters["late:replaced"] += 1
                self.parked[d] = (r, uid)
                self.counters["late:parked"] += 1
                return
        self.counters["late:dropped"] += 1

    def _close(self, r: int) -> None:
        rnd = self.rounds[r]
        rnd.state = "closed"
        self.fleet.run(list(rnd.members))
        state = RoundState(round_id=r, sampled=[], deadline=0.0, quorum=0, state="closing",
                           received={d: self.fleet.take(uid, d) for d, uid in rnd.members.items()})
        if isinstance(self.rule, AgreementRule):  # theta over the round's updates, as downlink_messages
            got = sorted(state.received)
            theta = self.rule.theta(np.stack([self.structures[d] for d in got]),
                                    np.stack([state.received[d] for d in got]), self.learner.ctx)
            downlinks = dict.fromkeys(got, theta)
        else:
            downlinks = merge_round(self.rule, self.learner.ctx, state, self.records)
        for d, m in downlinks.items():
            self.stats[d]["merged"] += 1
            self._send_mask(d, r, m)
        if self.cfg.eval_after_merge:
            self.q.after(self.timing.message_s(max(self.mask_bytes.values())) + 1e-6, "eval")
        rnd.members = dict.fromkeys(rnd.members, "")  # keep who took part, not the bits
        self.merges += 1
        if self.merges >= self.cfg.merges:
            self.stopping = True
        else:
            self.q.after(self.cfg.open_gap_s, "open")

    def _on_open(self, ev: Event) -> None:
        r = self.current + 1
        bound = self.cfg.max_staleness
        busy = {d for d in self.ids if self.tasked[d] > self.reported[d] and r - self.tasked[d] <= bound}
        pool = [d for d in self.ids if d not in busy and d not in self.parked]
        if not pool:
            self.q.after(max(self.cfg.open_gap_s, 0.1), "open")
            return
        target = sample_count(len(pool), rate=self.cfg.rate)
        sampled = sample_devices(pool, target, seed=self.cfg.seed, round_id=r)
        rnd = self.rounds[r] = _Round(set(sampled), quorum_count(target, self.cfg.quorum))
        self.current = r
        for d, (late_r, uid) in sorted(self.parked.items()):  # AggregatorCore._carry_parked
            if r - late_r > self.cfg.max_staleness:
                self.counters["late:expired"] += 1
            else:
                rnd.members[d] = uid
                self.counters["late:carried"] += 1
                self.counters["late:from_park"] += 1
        self.parked = {}
        for d in sampled:
            self.tasked[d] = r
            self._send_task(d, r)
        if math.isfinite(self.cfg.deadline_s):
            self.q.after(self.cfg.deadline_s, "deadline", data=r)

    def _on_deadline(self, ev: Event) -> None:
        if self.rounds[ev.data].state == "open":
            self.counters["rounds:deadline"] += 1
            self._close(ev.data)

    # -- the aggregator: buffered asynchronous -------------------------------------------
    def _async_up(self, d: str, base: int, uid: str) -> None:
        status = self.buffer.store(d, _PLACEHOLDER, base, uid)
        if status == "duplicate":
            return
        self.uid_of[d] = uid
        if not self.stopping:
            self._send_task(d, 0)  # no round: the next task at once
        if self.buffer.due:
            self._flush()

    def _flush(self) -> None:
        buffered = list(self.buffer.buffer)
        self.fleet.run(buffered)
        for d in buffered:
            self.buffer.latest[d].mask = self.fleet.take(self.uid_of[d], d)
            if self.cfg.record:
                self.update_bits[self.uid_of[d]] = self.buffer.latest[d].mask
        f = self.buffer.flush(self.rule, self.learner.ctx, self.structures)
        self.counters["async:stale_excluded"] += f.stale_excluded
        for d in f.boards:
            self.stats[d]["merged"] += 1
            self._send_mask(d, f.version, f.masks[d] if f.theta is None else f.theta)
        self.merges += 1
        if self.merges >= self.cfg.merges:
            self.stopping = True


_PLACEHOLDER = np.zeros(0, dtype=np.uint8)  # an async update's bits, filled in just before its flush


def run_rhythm(learner: Learner, timing: FleetTiming, cfg: RhythmConfig) -> RhythmResult:
    return _Sim(learner, timing, cfg).run()


def replay_async(res: RhythmResult, cfg: RhythmConfig, structures: dict[str, np.ndarray],
                 ctx: MergeContext) -> dict[str, np.ndarray]:
    """Feed a recorded async run's arrival order and updates to a fresh AsyncBuffer, as an aggregator
    consuming the same deliveries would: each board's newest merged mask. A replaced update never
    reached a merge, so its bits were not recorded; the buffer only needs the newest one's."""
    buf = AsyncBuffer(cfg.k, cfg.max_staleness, cfg.staleness)
    rule, newest = get_rule(cfg.rule), {}
    for _t, d, uid, base, _r in res.arrivals:
        buf.store(d, res.update_bits.get(uid, _PLACEHOLDER), base, uid)
        if buf.due or _t == res.arrivals[-1][0]:
            f = buf.flush(rule, ctx, structures)
            newest.update(f.masks if f.theta is None else dict.fromkeys(f.boards, f.theta))
    return newest


def summary(res: RhythmResult, timing: FleetTiming) -> dict[str, Any]:
    """Per profile: boards, mean updates sent / merged, merged masks received, boards with none."""
    out: dict[str, Any] = {}
    for prof in sorted(set(timing.profiles.values())):
        ds = [d for d, p in timing.profiles.items() if p == prof]
        st = [res.per_device[d] for d in ds]
        out[prof] = {"boards": len(ds),
                     "updates_sent": float(np.mean([s.get("sent", 0) for s in st])),
                     "updates_merged": float(np.mean([s.get("merged", 0) for s in st])),
                     "masks_received": float(np.mean([s.get("masks", 0) for s in st])),
                     "boards_without_mask": sum(1 for s in st if not s.get("masks", 0)),
                     "final_accuracy": float(np.mean([res.final_accuracy[d] for d in ds]))}
    return out
