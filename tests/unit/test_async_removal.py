"""A board removed from the async buffer (shared/async_buffer.py): named to a flush, its buffered update
is dropped (counted dropped_removed, never merged) and its latest update votes for nobody from then on;
the flush over the others is exactly the one over a fleet that never had the board."""

from __future__ import annotations

import numpy as np
import pytest

from shared.async_buffer import AsyncBuffer, Held, merge_buffered
from shared.bits import pack
from shared.merge_rules import AgreementRule, MergeContext, get_rule

NBITS = 64


def _fleet(n: int, seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray], MergeContext]:
    rng = np.random.default_rng(seed)
    s = rng.random((n, NBITS)) < 0.7
    m = s & (rng.random((n, NBITS)) < 0.5)
    return ({f"d{i}": np.packbits(s[i]) for i in range(n)}, [np.packbits(r) for r in m],
            MergeContext(NBITS, pack(np.ones(NBITS, dtype=bool))))


def _stored(buf: AsyncBuffer, masks: list[np.ndarray], boards: list[int], tag: str) -> None:
    for i in boards:
        buf.store(f"d{i}", masks[i], base=buf.version, update_id=f"d{i}:{tag}")


@pytest.mark.parametrize("staleness", ["constant", "sqrt"])
def test_a_removed_buffered_board_is_dropped_and_counted_not_merged(staleness: str) -> None:
    structures, masks, ctx = _fleet(4, seed=0)
    rule = get_rule("paper")
    buf, never = (AsyncBuffer(k=3, max_staleness=5, staleness=staleness) for _ in range(2))
    _stored(buf, masks, [0, 1, 2], "1")
    _stored(never, masks, [0, 1, 2], "1")
    buf.flush(rule, ctx, structures)
    never.flush(rule, ctx, structures)
    _stored(buf, masks, [3, 0, 1], "2")  # d3 buffered, then removed
    _stored(never, masks, [0, 1], "2")
    out = buf.flush(rule, ctx, structures, removed={"d3"})
    ref = never.flush(rule, ctx, structures)
    assert out.dropped == ["d3"] and out.boards == ref.boards == ["d0", "d1"]
    assert out.voters == ref.voters == 3  # d0, d1 and d2's latest
    assert all(np.array_equal(out.masks[d], ref.masks[d]) for d in ref.masks)
    assert "d3" not in buf.latest and buf.counts["dropped_removed"] == 1 and buf.counts["merged"] == 5
    c = buf.counts
    assert c["merged"] + c["replaced"] + c["dropped_removed"] + len(buf.buffer) == c["stored"]  # the invariant


def test_a_removed_boards_latest_update_stops_voting() -> None:
    structures, masks, ctx = _fleet(4, seed=1)
    rule = AgreementRule()
    buf = AsyncBuffer(k=3, max_staleness=5)
    _stored(buf, masks, [0, 1, 2], "1")
    buf.flush(rule, ctx, structures)
    _stored(buf, masks, [0, 1, 3], "2")
    votes = buf.latest.copy()  # what d2's latest would add
    out = buf.flush(rule, ctx, structures, removed={"d2"})
    assert out.dropped == [] and out.voters == 3 and buf.counts["dropped_removed"] == 0 and "d2" not in buf.latest
    with_d2 = merge_buffered(rule, ctx, 1, votes, ["d0", "d1", "d3"], structures, 5, "constant")
    assert with_d2.voters == 4 and out.theta is not None and with_d2.theta is not None
    assert not np.array_equal(out.theta, with_d2.theta)
    _stored(buf, masks, [0, 1, 3], "3")
    assert buf.flush(rule, ctx, structures).voters == 3  # forgotten: no need to name it again


def test_a_flush_whose_whole_buffer_was_removed_still_counts_and_a_missing_update_is_refused() -> None:
    structures, masks, ctx = _fleet(2, seed=2)
    buf = AsyncBuffer(k=1, max_staleness=5)
    _stored(buf, masks, [0], "1")
    out = buf.flush(get_rule("paper"), ctx, structures, removed=["d0"])
    assert (out.boards, out.dropped, out.version, buf.version) == ([], ["d0"], 1, 1)
    assert buf.counts["dropped_removed"] == 1 and buf.counts["merged"] == 0
    latest = {"d1": Held(masks[1], 0, "d1:1")}
    with pytest.raises(ValueError, match="not named removed"):  # the service's KeyError, named
        merge_buffered(get_rule("paper"), ctx, 1, latest, ["d0", "d1"], structures, 5, "constant")
