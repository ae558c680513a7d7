"""The fleet side of the clock simulator (shared/sim/rhythm.py): how long each board takes, how long a
message travels, and each board's training applied lazily so boards train in batches.

Timing. A board's k-th task takes  median_s x slowdown x lognormal(0, sigma)  simulated seconds, the
draw depending only on (seed, board, k): every mode sees the same durations for the same task
(common random numbers), so modes differ only by their rhythm. The median is the Jetson turnaround
measured by `make demo` (3.3 s, docs/results.md "Main job"); a slow board is a Pi 4 at 5x (the
worker's pi4 profile, worker/runtime.py) or 20x. A message takes latency_s + bytes / bandwidth.

Laziness. A board's state changes only when it finishes a task (it trains) or adopts a merged mask,
and a board works through its messages in order (a mask arriving mid-task is adopted after it, as the
worker does). So each board keeps a queue of pending operations, run only when a result is needed (a
merge needs the update, an evaluation the model): then the pending operations of many boards run as
a few batched calls, in each board's order. The result is the same as running each one at its event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shared.device import derive_seed
from shared.merge_rules import MergeContext

JETSON_MEDIAN_S = 3.3  # `make demo`, median Jetson task turnaround (docs/results.md)


class Learner(Protocol):
    nbits: int
    ctx: MergeContext
    downlink: str  # what its devices adopt: "bits" (packed full masks) or "q4" (theta, float32 per element)

    def device_ids(self) -> list[str]: ...
    def structures(self) -> dict[str, np.ndarray]: ...
    def train(self, devices: list[str], tags: list[int]) -> list[np.ndarray]:
        """One task per listed (distinct) board; `tags`: each task's round (or task number), its seed."""
    def apply(self, devices: list[str], masks: list[np.ndarray], versions: list[int]) -> None: ...
    def accuracy(self, split: str = "test", devices: list[str] | None = None) -> dict[str, float]: ...


@dataclass(frozen=True)
class FleetTiming:
    profiles: dict[str, str]  # board -> profile name
    slowdown: dict[str, float]  # profile -> factor
    median_s: float = JETSON_MEDIAN_S
    sigma: float = 0.3
    latency_s: float = 0.05
    bandwidth_bps: float = 1e6  # bytes per second, each way
    seed: int = 0

    @classmethod
    def mixed(cls, ids: list[str], slow_share: float, slowdown: float, *, seed: int = 0, **kw: float) -> FleetTiming:
        """`slow_share` of the boards (a seeded draw) are "slow" (slowdown x), the rest "fast" Jetsons."""
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "slow-boards")))
        slow = set(rng.choice(len(ids), size=round(slow_share * len(ids)), replace=False).tolist())
        profiles = {d: ("slow" if i in slow else "fast") for i, d in enumerate(ids)}
        return cls(profiles, {"fast": 1.0, "slow": slowdown}, seed=seed, **kw)

    def message_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bps


class Durations:
    """The k-th task duration of each board, drawn in blocks from the board's own generator."""

    def __init__(self, timing: FleetTiming) -> None:
        self.timing = timing
        self._rngs: dict[str, np.random.Generator] = {}
        self._drawn: dict[str, np.ndarray] = {}

    def __call__(self, device: str, k: int) -> float:
        drawn = self._drawn.get(device)
        if drawn is None or k >= len(drawn):
            rng = self._rngs.get(device)
            if rng is None:
                rng = self._rngs[device] = np.random.Generator(
                    np.random.PCG64(derive_seed(self.timing.seed, "duration", device)))
            more = rng.lognormal(0.0, self.timing.sigma, size=max(64, k + 1 - (0 if drawn is None else len(drawn))))
            drawn = more if drawn is None else np.concatenate([drawn, more])
            self._drawn[device] = drawn
        t = self.timing
        return float(t.median_s * t.slowdown[t.profiles[device]] * drawn[k])


@dataclass
class Pending:
    kind: str  # "train" (produces update `uid`) | "apply" (adopts `mask`, or theta, of `version`)
    uid: str = ""
    mask: np.ndarray | None = None
    tag: int = 0  # train: the task's round (its seed); apply: the mask's version


@dataclass
class LazyFleet:
    learner: Learner
    queues: dict[str, deque[Pending]] = field(default_factory=dict)
    updates: dict[str, np.ndarray] = field(default_factory=dict)  # uid -> packed full mask
    trained: int = 0
    calls: int = 0

    def train(self, device: str, uid: str, tag: int) -> None:
        self.queues.setdefault(device, deque()).append(Pending("train", uid, tag=tag))

    def apply(self, device: str, mask: np.ndarray, version: int) -> None:
        self.queues.setdefault(device, deque()).append(Pending("apply", mask=mask, tag=version))

    def take(self, uid: str, device: str) -> np.ndarray:
        """The update `uid` of `device` (running its pending operations if need be), handed over once."""
        if uid not in self.updates:
            self.run([device])
        return self.updates.pop(uid)

    def run(self, devices: Iterable[str] | None = None) -> None:
        """Run the pending operations of `devices` (all boards: None), in waves of one per board: the
        trains of a wave in one learner call, then its adoptions in another."""
        todo = [d for d in (self.queues if devices is None else devices) if self.queues.get(d)]
        while todo:
            firsts = [(d, self.queues[d].popleft()) for d in todo]
            trains = [(d, p) for d, p in firsts if p.kind == "train"]
            applies = [(d, p) for d, p in firsts if p.kind == "apply" and p.mask is not None]
            if trains:
                out = self.learner.train([d for d, _ in trains], [p.tag for _, p in trains])
                self.updates.update({p.uid: m for (_, p), m in zip(trains, out, strict=True)})
                self.trained += len(trains)
                self.calls += 1
            if applies:
                self.learner.apply([d for d, _ in applies], [p.mask for _, p in applies if p.mask is not None],
                                   [p.tag for _, p in applies])
            todo = [d for d in todo if self.queues[d]]
