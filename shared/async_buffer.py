"""Buffered asynchronous merging (FedBuff for binary masks), pure: the simulator's state, and the state
an asynchronous aggregator keeps (no I/O here).

No rounds: every board trains whenever it is idle and names in its update the version of the merged
mask it trained from (its `base`). The buffer keeps each board's latest update with that base. Every K
stored updates it *flushes*: version v becomes v + 1, and each buffered board gets its own merged mask
from a vote over

  - the buffered updates (always: every stored update is merged for its board, however stale), and
  - the latest updates of the other boards whose staleness tau = v - base is within `max_staleness`,

each vote weighted by s(tau): 1 ("constant": the vote is the pipeline's merge rule unchanged, the
same function the synchronous rounds call) or 1/sqrt(1 + tau) ("sqrt", FedBuff's polynomial weight).
tau counts merges since the mask the update trained from (FedBuff's v - v_start).

Under the agreement rule (shared/agreement.py: uploads are Bernoulli samples or thresholded masks, the
downlink is theta as 4-bit levels) the same voters give one theta per element,

  theta = (sum_i w_i * ones_i + 1) / (sum_i w_i * holders_i + 2),   w_i = s(tau_i),

ones_i / holders_i being 1 where voter i's sample / structure holds the element: with "constant" this is
exactly AgreementRule.theta over those voters (FedPM's Beta(1, 1) posterior mean); with "sqrt" a stale
sample counts less against the prior as well as against fresh ones. Every buffered board receives that
theta inside its own structure (shared.rounds.agreement_message: enc "q4"), so a Flush carries `theta`
and no bit masks.

A board appears in the buffer once: an update stored while its previous one is still buffered
replaces it (counted `replaced`); the board then gets one merged mask for both. A board removed by an
operator (`fedmask devices remove`) is named to the next flush (`removed`): its buffered update is
dropped there (counted `dropped_removed`, not merged, nothing sent to it) and its latest update is
forgotten, so it votes for nobody from then on. Every stored update therefore ends merged, replaced by
a newer one of the same board, or dropped because its board was removed, never lost nor counted
twice; a redelivery of an update already stored (same board, same update id) is a `duplicate` no-op.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shared.bits import pack, unpack
from shared.merge_rules import AgreementRule, MergeContext, MergeRule

STALENESS = ("constant", "sqrt")
WEIGHTED_RULES = ("paper", "head", "body", "agreement")  # the rules a staleness weight applies to
StoreStatus = Literal["stored", "replaced", "duplicate"]


def staleness_weight(kind: str, tau: int) -> float:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + tau)
    raise ValueError(f"unknown staleness function {kind!r}; choose one of {', '.join(STALENESS)}")


def check_weighting(rule: MergeRule, staleness: str) -> None:
    """Refuse, before any update arrives, a rule the staleness weight cannot be applied to: a weighted
    vote exists for the majority rules and the agreement rule; any rule runs unchanged under "constant"."""
    staleness_weight(staleness, 0)
    if staleness != "constant" and rule.name not in WEIGHTED_RULES:
        raise ValueError(f"staleness {staleness!r} weighs the votes of {', '.join(WEIGHTED_RULES)}, not of "
                         f"{rule.name!r}; use staleness constant")


def _vote_region(rule: MergeRule, ctx: MergeContext) -> np.ndarray:
    """Where a majority rule votes, unpacked: paper everywhere, head the pruned layers, body the rest."""
    pruned = unpack(ctx.pruned_region, ctx.nbits).astype(bool)
    regions = {"paper": np.ones(ctx.nbits, dtype=bool), "head": pruned, "body": ~pruned}
    if rule.name not in regions:
        raise ValueError(f"staleness-weighted votes need a majority rule (paper, head, body), not {rule.name!r}; "
                         "use staleness constant")
    return regions[rule.name]


def weighted_merge(rule: MergeRule, ctx: MergeContext, structures: np.ndarray, masks: np.ndarray,
                   weights: np.ndarray, rows: int) -> np.ndarray:
    """The first `rows` voters' merged masks (packed), under `rule` with weighted votes: inside the
    rule's region an element covered by 2+ voters takes the bit with the larger total weight, a tie
    keeps the device's own bit; never a 1 outside a structure. All weights equal: exactly rule.merge
    (tests/unit/test_async_buffer.py checks this bit for bit)."""
    region = _vote_region(rule, ctx)
    s = unpack_rows(structures, ctx.nbits)
    m = unpack_rows(masks, ctx.nbits)
    w = weights.astype(np.float64)
    voters = s.sum(axis=0, dtype=np.int64)
    ones = w @ m.astype(np.float64)
    zeros = w @ (s & ~m).astype(np.float64)
    tie = np.abs(ones - zeros) <= 1e-9 * np.maximum(ones + zeros, 1.0)  # float sums in any order
    can = (voters >= 2) & region & ~tie
    up, down = pack(can & (ones > zeros)), pack(can & (zeros > ones))
    out: np.ndarray = (masks[:rows] | (structures[:rows] & up)) & ~down
    return out


def unpack_rows(packed: np.ndarray, nbits: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=nbits).astype(bool)


def weighted_theta(structures: np.ndarray, samples: np.ndarray, weights: np.ndarray, nbits: int) -> np.ndarray:
    """The agreement theta per element (float32, all nbits) with voter i's ones and holders counted
    w_i times. All weights 1: exactly shared.agreement.posterior_mean (AgreementRule.theta) bit for bit,
    since integer sums are exact in float64 and one division rounded to float64 then float32 is the
    float32 division (tests/unit/test_async_agreement.py). Rows are summed in the given order, so the
    service and a replay that list the voters alike get the same floats."""
    if structures.shape != samples.shape or structures.ndim != 2 or len(weights) != len(structures):
        raise ValueError(f"structures {structures.shape}, samples {samples.shape} and {len(weights)} weights differ")
    if np.any(samples & ~structures):
        raise ValueError("a sample has a 1 outside its structure")
    holders = np.zeros(nbits, dtype=np.float64)
    ones = np.zeros(nbits, dtype=np.float64)
    for s_row, m_row, w in zip(structures, samples, weights.astype(np.float64), strict=True):
        holders += w * np.unpackbits(s_row, count=nbits)  # one row at a time: memory stays O(nbits)
        ones += w * np.unpackbits(m_row, count=nbits)
    theta: np.ndarray = ((ones + 1.0) / (holders + 2.0)).astype(np.float32)
    return theta


@dataclass
class Held:
    mask: np.ndarray  # packed full mask of the board's latest update
    base: int  # the merged-mask version it trained from
    update_id: str


@dataclass
class Flush:
    version: int  # the version of the merged masks sent
    masks: dict[str, np.ndarray]  # bit rules: buffered board -> its packed full merged mask (agreement: empty)
    voters: int  # updates that voted (buffered + fresh enough others)
    stale_excluded: int  # other boards' latest updates left out as too stale
    taus: dict[str, int]  # buffered board -> staleness of its update, in buffer order
    # The agreement rule: theta per element (float32, all nbits); every buffered board gets it inside its
    # own structure as q4 levels (shared.rounds.agreement_message). None under a bit rule.
    theta: np.ndarray | None = None
    dropped: list[str] = field(default_factory=list)  # buffered boards removed: their update is not merged

    @property
    def boards(self) -> list[str]:
        """The buffered boards this flush sends a downlink to, whichever the rule."""
        return list(self.taus)


@dataclass
class AsyncBuffer:
    k: int
    max_staleness: int
    staleness: str = "constant"
    version: int = 0
    latest: dict[str, Held] = field(default_factory=dict)
    buffer: list[str] = field(default_factory=list)  # boards with a buffered update, in arrival order
    pending: int = 0  # updates stored since the last flush (counts replacements)
    counts: Counter[str] = field(default_factory=Counter)
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_staleness < 0:
            raise ValueError(f"buffer size K must be >= 1 and max staleness >= 0, got {self.k}, {self.max_staleness}")
        staleness_weight(self.staleness, 0)  # refuses an unknown function early

    def store(self, device: str, mask: np.ndarray, base: int, update_id: str) -> StoreStatus:
        """Keep `device`'s update (packed full mask, trained from merged version `base`)."""
        if (device, update_id) in self._seen:
            self.counts["duplicate"] += 1
            return "duplicate"
        if base > self.version:
            raise ValueError(f"{device}'s update names version {base}, newer than the buffer's {self.version}")
        self._seen.add((device, update_id))
        self.latest[device] = Held(mask, base, update_id)
        self.pending += 1
        self.counts["stored"] += 1
        if device in self.buffer:
            self.counts["replaced"] += 1
            return "replaced"
        self.buffer.append(device)
        return "stored"

    @property
    def due(self) -> bool:
        return self.pending >= self.k

    def flush(self, rule: MergeRule, ctx: MergeContext, structures: dict[str, np.ndarray],
              removed: Collection[str] = ()) -> Flush:
        """Merge the buffered updates (see the module docstring); empties the buffer, bumps the version.
        The boards in `removed` are dropped from the buffer and forgotten (their latest votes no more)."""
        out = merge_buffered(rule, ctx, self.version, self.latest, list(self.buffer), structures,
                             self.max_staleness, self.staleness, removed)
        for d in removed:
            self.latest.pop(d, None)
        self.version += 1
        self.buffer, self.pending = [], 0
        self.counts["flushes"] += 1
        self.counts["merged"] += len(out.boards)
        self.counts["dropped_removed"] += len(out.dropped)
        return out


def merge_buffered(rule: MergeRule, ctx: MergeContext, version: int, latest: dict[str, Held], buffered: list[str],
                   structures: dict[str, np.ndarray], max_staleness: int, staleness: str,
                   removed: Collection[str] = ()) -> Flush:
    """One flush over given state, pure: AsyncBuffer's own flush and the pipeline's async aggregator
    (aggregator/core_async.py, state read from Redis) both call it, so both merge bit for bit alike.
    A board in `removed` neither votes nor is merged; if buffered it is listed in Flush.dropped. The
    service holds no update (nor structure) of a removed board, so `latest` may lack it."""
    gone = set(removed)
    dropped = [d for d in buffered if d in gone]
    buffered = [d for d in buffered if d not in gone]
    latest = {d: held for d, held in latest.items() if d not in gone}
    if missing := [d for d in buffered if d not in latest]:
        raise ValueError(f"buffered boards {missing} hold no update and are not named removed")
    others = sorted(d for d in latest if d not in set(buffered))
    fresh = [d for d in others if version - latest[d].base <= max_staleness]
    voters, stale = buffered + fresh, len(others) - len(fresh)
    taus = {d: version - latest[d].base for d in voters}
    if not buffered:  # every buffered board was removed: the flush still counts its drops
        return Flush(version + 1, {}, 0, stale, {}, dropped=dropped)
    s = np.stack([structures[d] for d in voters])
    m = np.stack([latest[d].mask for d in voters])
    mine = {d: taus[d] for d in buffered}
    w = np.array([staleness_weight(staleness, taus[d]) for d in voters])
    if isinstance(rule, AgreementRule):  # the downlink is theta, not bits (module docstring)
        # "constant": the pipeline's rule, unchanged (its float32 arithmetic, not weighted_theta's)
        theta = rule.theta(s, m, ctx) if staleness == "constant" else weighted_theta(s, m, w, ctx.nbits)
        return Flush(version + 1, {}, len(voters), stale, mine, theta=theta, dropped=dropped)
    if staleness == "constant":
        merged = rule.merge(s, m, ctx)[: len(buffered)]  # the pipeline's rule, unchanged
    else:
        merged = weighted_merge(rule, ctx, s, m, w, len(buffered))
    return Flush(version + 1, dict(zip(buffered, merged, strict=True)), len(voters), stale, mine, dropped=dropped)
