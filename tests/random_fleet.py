"""Random packed structures and masks (mask inside structure) for the merge and buffer unit tests."""

from __future__ import annotations

import numpy as np

from shared.bits import pack
from shared.merge_rules import MergeContext


def random_fleet(n: int, nbits: int, seed: int, *, ones: float = 0.5) -> tuple[np.ndarray, np.ndarray, MergeContext]:
    """n structures (70% of elements held) and masks (`ones` of the held elements set), packed, and a
    context whose pruned region is the second half of the elements."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, nbits)) < 0.7
    m = s & (rng.random((n, nbits)) < ones)
    region = np.zeros(nbits, dtype=bool)
    region[nbits // 2:] = True
    return np.packbits(s, axis=1), np.packbits(m, axis=1), MergeContext(nbits, pack(region))
