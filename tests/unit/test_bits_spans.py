"""shared.bits.Spans: selecting and scattering through a byte-aligned prefix, runs and the scattered rest
gives exactly what select_at and scatter_at give, for structures with long runs, none, runs at either end,
a leading run of odd length, full and empty ones."""

from __future__ import annotations

import numpy as np
import pytest

from shared.bits import pack, positions, scatter_at, scatter_spans, select_at, select_spans, spans


def _structure(rng: np.random.Generator, nbits: int, kind: str) -> np.ndarray:
    bits = rng.random(nbits) < 0.6
    if kind == "run-middle":
        bits[nbits // 4: nbits // 4 + nbits // 2] = True
    elif kind == "run-ends":
        bits[:5000] = True
        bits[-6000:] = True
    elif kind == "all":
        bits[:] = True
    elif kind == "none":
        bits[:] = False
    elif kind == "prefix-odd":  # a leading run whose length is not a multiple of 8, then random bits
        bits[:4099] = True
        bits[4099] = False
    return pack(bits)


@pytest.mark.parametrize("kind", ["random", "run-middle", "run-ends", "all", "none", "prefix-odd"])
@pytest.mark.parametrize("nbits", [20_003, 65_536])
def test_spans_select_and_scatter_equal_the_index_versions(kind: str, nbits: int) -> None:
    rng = np.random.default_rng([nbits, len(kind)])
    structure = _structure(rng, nbits, kind)
    where = positions(structure, nbits)
    sp = spans(where, nbits)
    assert sp.count == len(where) and sp.prefix + sum(n for _, _, n in sp.runs) + len(sp.rest_full) == len(where)
    assert sp.prefix % 8 == 0
    if kind == "run-middle":
        assert sp.runs, "a long run was not found"
    if kind in ("run-ends", "all", "prefix-odd"):
        assert sp.prefix >= 4096, "the leading run was not taken as the prefix"
    mask = pack(rng.random(nbits) < 0.5)
    assert np.array_equal(select_spans(mask, sp), select_at(mask, where, nbits))
    selected = pack(rng.random(len(where)) < 0.5) if len(where) else np.zeros(0, np.uint8)
    assert np.array_equal(scatter_spans(selected, sp), scatter_at(selected, where, nbits))
