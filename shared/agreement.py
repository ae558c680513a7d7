"""Per-element agreement instead of a majority bit (after FedPM, Isik et al., ICLR 2023).

A majority bit rounds each element's agreement to 0 or 1 and throws the rest away; here the
server keeps it. Devices upload one Bernoulli sample of their mask probabilities, sigmoid(S), inside
their structure: an unbiased estimate at 1 bit per element. Per element j, over the round's
participants whose structure holds j (`holders`), with `ones` of their samples set:

    theta_j = (ones_j + 1) / (holders_j + 2)        (the posterior mean under a Beta(1, 1) prior)

The prior is reset every round (as in the FedPM reference code): with partial participation each
round's sample is a fresh estimate of the fleet's probabilities, and the device's own scores carry
the history. Each participant receives theta inside its own structure, quantized to 4 bits
(enc "q4": 16 levels, two per byte); it then sets its scores to

    S <- (1 - share) * S + share * logit(clip(theta, clip, 1 - clip))

`share` is how much the device takes from the fleet (1: FedPM's global scores; 0: no merge). It is
a per-task choice made on validation, because devices whose data overlap little gain less.
"""

from __future__ import annotations

import numpy as np

from shared.aggregate import vote_counts

LEVELS = 15  # 4 bits: theta in {0, 1/15, ..., 1}


def posterior_mean(structures: np.ndarray, samples: np.ndarray, nbits: int) -> np.ndarray:
    """theta per element (float32, all nbits) from packed structures and packed samples."""
    holders, ones = vote_counts(structures, samples, nbits)
    theta: np.ndarray = ((ones.astype(np.float32) + 1) / (holders.astype(np.float32) + 2)).astype(np.float32)
    return theta


def quantize(theta: np.ndarray) -> np.ndarray:
    """theta in [0, 1] -> uint8 levels 0..LEVELS (round half to even, as numpy does everywhere)."""
    levels: np.ndarray = np.rint(np.clip(theta, 0.0, 1.0) * LEVELS).astype(np.uint8)
    return levels


def dequantize(levels: np.ndarray) -> np.ndarray:
    out: np.ndarray = levels.astype(np.float32) / np.float32(LEVELS)
    return out


def pack_levels(levels: np.ndarray) -> tuple[bytes, int]:
    """4-bit levels, two per byte (first element in the high nibble); returns (bytes, nbits = 4n)."""
    lv = np.asarray(levels, dtype=np.uint8)
    if lv.size and int(lv.max()) > LEVELS:
        raise ValueError(f"levels must be 0..{LEVELS}")
    padded = np.zeros(lv.size + (lv.size & 1), dtype=np.uint8)
    padded[: lv.size] = lv
    return ((padded[0::2] << 4) | padded[1::2]).tobytes(), 4 * lv.size


def unpack_levels(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(2 * raw.size, dtype=np.uint8)
    out[0::2], out[1::2] = raw >> 4, raw & 0x0F
    if out.size < count:
        raise ValueError(f"{raw.size} bytes hold {out.size} levels, expected {count}")
    return out[:count]


def blend_scores(own: np.ndarray, theta: np.ndarray, *, share: float, clip: float) -> np.ndarray:
    """The device's new scores: its own, moved `share` of the way to the fleet's logit."""
    t = np.clip(theta.astype(np.float64), clip, 1.0 - clip)
    fleet = np.log(t / (1.0 - t))
    out: np.ndarray = ((1.0 - share) * own.astype(np.float64) + share * fleet).astype(np.float32)
    return out


def bernoulli_sample(probabilities: np.ndarray, seed: int) -> np.ndarray:
    """One sample of the mask, bool per element, from PCG64(seed): the same draw on every platform
    for the same float32 probabilities."""
    rng = np.random.Generator(np.random.PCG64(seed))
    draw: np.ndarray = rng.random(probabilities.size, dtype=np.float32) < probabilities.astype(np.float32)
    return draw
