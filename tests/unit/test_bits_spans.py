"""shared.bits.Spans: selecting and scattering through runs plus the scattered rest gives exactly what
select_at and scatter_at give, for structures with long runs, none, runs at either end, and empty ones."""

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
    return pack(bits)


@pytest.mark.parametrize("kind", ["random", "run-middle", "run-ends", "all", "none"])
@pytest.mark.parametrize("nbits", [20_003, 65_536])
def test_spans_select_and_scatter_equal_the_index_versions(kind: str, nbits: int) -> None:
    rng = np.random.default_rng([nbits, len(kind)])
    structure = _structure(rng, nbits, kind)
    where = positions(structure, nbits)
    sp = spans(where, nbits)
    assert sp.count == len(where) and sum(n for _, _, n in sp.runs) + len(sp.rest_full) == len(where)
    if kind in ("run-middle", "run-ends", "all"):
        assert sp.runs, "a long run was not found"
    mask = pack(rng.random(nbits) < 0.5)
    assert np.array_equal(select_spans(mask, sp), select_at(mask, where, nbits))
    selected = pack(rng.random(len(where)) < 0.5) if len(where) else np.zeros(0, np.uint8)
    assert np.array_equal(scatter_spans(selected, sp), scatter_at(selected, where, nbits))
