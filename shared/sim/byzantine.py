"""Byzantine boards for the simulator: devices that prune and say hello honestly (so their structure
is one the server accepts) but send a poisoned mask in every update.

Attacks, applied to the bits inside the device's structure after it trained:
  zeros   every bit 0 (votes to switch everything off)
  ones    every bit 1 (votes to switch everything on)
  invert  the complement of what the device trained (votes against its honest result)
The device itself still adopts the merged masks it receives; its accuracy is left out of the
honest devices' mean (`honest_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shared import codec
from shared.bits import pad_mask
from shared.device import derive_seed

ATTACKS = ("zeros", "ones", "invert")


@dataclass(frozen=True)
class Adversary:
    devices: frozenset[str]
    attack: str

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {ATTACKS}")

    def poison(self, update: codec.Message) -> codec.Message:
        """The update this board sends instead of `update` (same header, same bit count)."""
        if update.device not in self.devices:
            return update
        assert update.bits is not None and update.nbits is not None  # an update always carries bits
        n = update.nbits
        if self.attack == "invert":
            raw = np.bitwise_not(np.frombuffer(update.bits, dtype=np.uint8))
        else:
            raw = np.full((n + 7) // 8, 0xFF if self.attack == "ones" else 0, dtype=np.uint8)
        if raw.size:
            raw[-1] &= pad_mask(n)  # padding bits stay 0, as the codec insists
        return codec.make_update(device=update.device, round=update.round, model=update.model,
                                 layout=update.layout, bits=raw.tobytes(), nbits=n, version=update.version or 0,
                                 enc=update.enc or "structure", stats=update.stats)


def pick_byzantine(device_ids: Iterable[str], share: float, seed: int) -> frozenset[str]:
    """ceil(share x devices) devices (at least one), drawn from the seed alone."""
    pool = sorted(device_ids)
    if not 0 < share < 1 or not pool:
        raise ValueError(f"share must be in (0, 1) of a non-empty fleet, got {share} of {len(pool)}")
    count = max(1, math.ceil(share * len(pool) - 1e-9))
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "byzantine")))
    return frozenset(pool[i] for i in rng.choice(len(pool), size=count, replace=False))


def honest_mean(per_device: dict[str, float], byzantine: Iterable[str]) -> float:
    bad = set(byzantine)
    vals = [v for d, v in per_device.items() if d not in bad and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")
