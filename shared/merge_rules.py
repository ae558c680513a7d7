"""Merge rules: how one round's masks become each participant's personalized merged mask.

Each rule is one small class over packed bits; all of them call the same kernel
(shared.aggregate.merge_masks). A rule never puts a 1 outside a device's structure.

- paper:  the paper's Sec. 3.6. Every element inside 2+ participants' structures takes the
          majority bit of those participants; ties keep the device's own bit.
- body:   vote only outside the pruned last layers; the pruned (classifier) layers stay personal.
          Motivation: pruning picks overlapping elements on devices with unrelated classes, so a
          majority there overwrites personal decisions (measurements: docs/results.md, "What was tried").
- head:   the mirror of body: vote only inside the pruned layers; the body stays personal.
- affinity: like paper in the body; in the pruned layers each device votes only with the
          participants whose pruned structure overlaps its own at least `min_jaccard`.
- consensus: a device's bit changes only under a supermajority (>= q of the overlapping voters);
            a tie keeps the device's own bit.
- robust: head's vote made robust to `tolerate` (default 1) Byzantine voters per element: a
          device's bit takes the majority only when it leads by at least 2*tolerate + 1 votes;
          anything closer keeps the device's own bit. Why not a trimmed vote: see the class.
- agreement: per-element agreement of the participants' Bernoulli samples, sent as 4-bit levels
          (shared/agreement.py); devices blend it into their scores. Over `upload="sample"` it is
          FedPM's estimate; over thresholded masks, the vote share (fedmask-adapt-local).
- local:  nothing is merged (each device keeps its own bits); a diagnostic floor, not a product rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared.aggregate import merge_masks, vote_counts
from shared.agreement import posterior_mean
from shared.bits import pack, popcount, unpack


@dataclass(frozen=True)
class MergeContext:
    nbits: int
    pruned_region: np.ndarray  # packed: 1 on the elements of the layers one-shot pruning prunes


class MergeRule(Protocol):
    name: str

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray: ...


@dataclass(frozen=True)
class PaperRule:
    name: str = "paper"

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        return merge_masks(structures, masks, ctx.nbits)


@dataclass(frozen=True)
class BodyRule:
    name: str = "body"

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        return merge_masks(structures, masks, ctx.nbits, vote_region=_invert(ctx.pruned_region, ctx.nbits))


@dataclass(frozen=True)
class HeadRule:
    """Vote only inside the pruned layers; the unpruned body stays personal. Devices that share a
    class share that class's rows of the pruned head, so the vote there pools related devices,
    while a body majority of unrelated devices overwrites features each device relies on."""

    name: str = "head"

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        return merge_masks(structures, masks, ctx.nbits, vote_region=ctx.pruned_region)


@dataclass(frozen=True)
class AffinityRule:
    name: str = "affinity"
    min_jaccard: float = 0.5

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        body = _invert(ctx.pruned_region, ctx.nbits)
        out = merge_masks(structures, masks, ctx.nbits, vote_region=body)
        pruned = structures & ctx.pruned_region
        for i in range(len(structures)):
            peers = [j for j in range(len(structures)) if _jaccard(pruned[i], pruned[j]) >= self.min_jaccard]
            if len(peers) < 2:
                continue
            rows = [i, *(j for j in peers if j != i)]
            merged_i = merge_masks(structures[rows], masks[rows], ctx.nbits, vote_region=ctx.pruned_region)[0]
            out[i] = (out[i] & body) | (merged_i & ctx.pruned_region)
        return out


@dataclass(frozen=True)
class ConsensusRule:
    """Supermajority: a device's bit changes only when at least `q` of the voters whose structures
    contain the element hold the other bit; a tie keeps the device's own bit. Weak majorities of
    unrelated devices no longer overwrite personal bits. With q <= 0.5 this is the paper's rule."""

    name: str = "consensus"
    q: float = 0.8

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        voters, ones = vote_counts(structures, masks, ctx.nbits)
        v = voters.astype(np.int32)
        o = ones.astype(np.int32)
        strong_one = (v >= 2) & (o >= self.q * v)
        strong_zero = (v >= 2) & ((v - o) >= self.q * v)
        # Both hold only when q <= 0.5 (never at the default): then the majority decides, and a tie
        # keeps each device's own bit instead of giving every voter a 1.
        both = strong_one & strong_zero
        strong_one &= ~both | (2 * o > v)
        strong_zero &= ~both | (2 * o < v)
        out = np.empty_like(masks)
        for i in range(len(masks)):
            own = unpack(masks[i], ctx.nbits)
            inside = unpack(structures[i], ctx.nbits)
            merged = np.where(strong_one, True, np.where(strong_zero, False, own)) & inside
            out[i] = pack(merged)
        return out


@dataclass(frozen=True)
class RobustRule:
    """The preset's head vote, bounded against `tolerate` = b lying voters per element.

    Let D = ones - zeros among the voters of an element (the devices whose structure holds it) and
    D_h the same count over the honest voters alone; b Byzantine votes move D by at most b. A device's
    bit takes the majority only when |D| >= 2b + 1, otherwise it keeps its own bit. Hence:
      - an overridden bit always has an honest majority of at least b + 1 behind it: lying voters
        can never impose a bit the honest voters do not hold by majority;
      - where |D_h| <= b (no clear honest majority) the result is the device's own bit, attack or
        not, and where |D_h| >= 3b + 1 it is the honest majority, attack or not;
      - in between, lying voters can at most keep a device's own bit (its own honest training).
    The plain majority gives no such bound: one vote breaks every honest tie and ties every honest
    lead of one.

    Not a coordinate-wise trimmed vote: on binary votes, dropping the t highest and t lowest votes
    removes t ones and t zeros, which leaves ones - zeros (and so the majority) unchanged wherever
    both sides have t votes; a lying vote still breaks ties. The margin above is what trimming
    would bound on real-valued votes.

    Stateless, so the pipeline runs it with no history in Redis; unlike a cap on how far an update may
    move from the device's last merged mask, it also holds in a device's first round."""

    name: str = "robust"
    tolerate: int = 1
    region: str = "head"  # "head": vote in the pruned layers only (the preset's rule); "all": everywhere

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        if self.tolerate < 0 or self.region not in ("head", "all"):
            raise ValueError(f"robust rule: tolerate must be >= 0 and region head or all, got {self}")
        voters, ones = vote_counts(structures, masks, ctx.nbits)
        lead = 2 * ones.astype(np.int32) - voters.astype(np.int32)  # ones - zeros
        margin = 2 * self.tolerate + 1
        up, down = pack(lead >= margin), pack(lead <= -margin)
        if self.region == "head":
            up &= ctx.pruned_region
            down &= ctx.pruned_region
        # As the kernel's out_i = (M_i | (S_i & up)) & ~down: never a 1 outside S_i (M_i within S_i).
        out: np.ndarray = (masks | (structures & up)) & ~down
        return out


@dataclass(frozen=True)
class AgreementRule:
    """The downlink is the agreement theta, not bits (`downlink == "q4"`); `merge` gives the
    thresholded view (theta > 1/2, inside each structure) for callers that need bits."""

    name: str = "agreement"
    downlink: str = "q4"

    def theta(self, structures: np.ndarray, samples: np.ndarray, ctx: MergeContext) -> np.ndarray:
        return posterior_mean(structures, samples, ctx.nbits)

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        majority = pack(self.theta(structures, masks, ctx) > 0.5)
        return np.stack([majority & s for s in structures])


@dataclass(frozen=True)
class LocalRule:
    name: str = "local"

    def merge(self, structures: np.ndarray, masks: np.ndarray, ctx: MergeContext) -> np.ndarray:
        return masks.copy()


RULES: dict[str, type] = {"paper": PaperRule, "body": BodyRule, "head": HeadRule, "affinity": AffinityRule,
                          "consensus": ConsensusRule, "robust": RobustRule, "agreement": AgreementRule,
                          "local": LocalRule}


def get_rule(name: str) -> MergeRule:
    try:
        rule: MergeRule = RULES[name]()
    except KeyError:
        raise ValueError(f"unknown merge rule {name!r}; choose one of {sorted(RULES)}") from None
    return rule


def _invert(packed: np.ndarray, nbits: int) -> np.ndarray:
    out: np.ndarray = np.bitwise_not(packed)
    tail = nbits % 8
    if tail:  # keep padding bits zero
        out[-1] &= np.uint8((0xFF << (8 - tail)) & 0xFF)
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = popcount(a | b)
    return popcount(a & b) / union if union else 0.0
