"""The numpy merge kernel behind shared.aggregate.merge_masks (used when numba is absent or the merge is
too small to pay for its compile): the FedMask vote on 64-bit words, one cache-sized block at a time.

Votes are counted with bit-sliced carry-save adders: full adders reduce the devices' rows column by
column (many rows per numpy call) down to ceil(log2(n+1)) bit planes of the count, which bit-sliced
comparators then turn into A ("vote and majority is 1") and Z ("vote and majority is 0"); the output
is out_i = (M_i | (S_i & A)) & ~Z (shared/aggregate.py's docstring derives it). `_plan` builds the
adder tree once per device count; `_Kernel` runs it over blocks of `_Words`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
W64 = npt.NDArray[np.uint64]

ALIGN = 8  # bytes per word


def bad_rows(structures: U8, masks: U8) -> np.ndarray:
    """Indices of devices whose mask has a 1 outside their structure."""
    return np.flatnonzero(np.any(masks & ~structures, axis=1))


def raise_bad_row(row: int) -> None:
    raise ValueError(f"masks[{row}] has a 1 outside structures[{row}] (mask must be a subset of its structure)")


class _Step(NamedTuple):
    """One batch of adders in the counting tree (identical for the structure and mask trees)."""

    col: int  # column (bit weight) being reduced
    adders: int  # full adders working side by side; 0 means a single half adder
    fixed: int  # rows left untouched at the front of the column
    carry_row: int  # first row of column col+1 that receives the carries
    from_input: bool  # column 0's first step reads the input rows instead of the tree


@functools.lru_cache(maxsize=32)
def _plan(n: int) -> tuple[tuple[_Step, ...], tuple[int, ...]]:
    """Carry-save schedule counting n rows: (steps, rows each column needs).

    Each column is reduced to a single row (its bit plane, left in row 0) before the next
    one starts: three rows at a time go through full adders (sum stays, carry moves up a
    column), a last pair through a half adder. Sums overwrite their first operand, so the
    rows in use stay contiguous from row 0.
    """
    rows, caps = [n], [0]
    steps: list[_Step] = []
    col = 0
    while col < len(rows):
        while rows[col] > 1:
            if col + 1 == len(rows):
                rows.append(0)
                caps.append(0)
            r = rows[col]
            adders = 0 if r == 2 else r // 3
            fixed = r - 3 * adders if adders else 0
            produced = max(adders, 1)
            steps.append(_Step(col, adders, fixed, rows[col + 1], col == 0 and r == n))
            rows[col + 1] += produced
            rows[col] = fixed + produced
            caps[col] = max(caps[col], rows[col])
            caps[col + 1] = max(caps[col + 1], rows[col + 1])
        col += 1
    return tuple(steps), tuple(caps)


Instr = tuple[Callable[..., object], tuple[object, ...]]


def _adder_calls(st: _Step, src: W64, dst: W64, up: W64) -> list[Instr]:
    """The numpy calls of one step: rows of `src` (column st.col) -> sums in `dst`, carries in `up`.

    Full adder: carry = b ^ ((b ^ a) & (b ^ c)) (the majority), sum = a ^ b ^ c. In this order
    the sum may overwrite `a` (src is dst) while b and c stay intact: no scratch rows needed.
    """
    xor, band = np.bitwise_xor, np.bitwise_and
    if st.adders == 0:
        a, b = src[0], src[1]
        return [(band, (a, b, up[st.carry_row])), (xor, (a, b, dst[0]))]
    t, k = st.adders, st.fixed
    a, b, c = src[k : k + t], src[k + t : k + 2 * t], src[k + 2 * t : k + 3 * t]
    carry, total = up[st.carry_row : st.carry_row + t], dst[k : k + t]
    calls: list[Instr] = [] if src is dst or not k else [(np.copyto, (dst[:k], src[:k]))]
    return [
        *calls,
        (xor, (b, c, carry)),
        (xor, (a, b, total)),
        (band, (carry, total, carry)),
        (xor, (carry, b, carry)),
        (xor, (total, c, total)),
    ]


class Kernel:
    """Scratch buffers and the prebuilt numpy calls that merge one thread's blocks.

    The structure tree and the mask tree run side by side: after their first steps, which
    read the inputs, every step is one call per operation for both. Views are built once per
    block width, and the hot operands are contiguous (numpy's per-call cost triples for
    strided multi-axis operands).
    """

    def __init__(self, n: int, block_words: int, threshold: int, has_region: bool) -> None:
        self.steps, caps = _plan(n)  # n >= 2 here
        # Planes compared: voters needs n.bit_length(); 2*ones needs one more.
        self.planes = n.bit_length() + 1
        self.threshold, self.has_region = threshold, has_region
        bw = block_words
        # Each tree column is a run of rows; the pair axis (structure tree, mask tree) sits
        # next to the words so that a run of rows is one contiguous range (numpy copies
        # operands whose address ranges interleave). The last row stays zero: missing planes.
        starts = list(itertools.accumulate(caps, initial=0))
        self.tree = np.zeros((starts[-1] + 1, 2, bw), dtype=np.uint64)
        self.cols = [(a, b) for a, b in itertools.pairwise(starts)]
        self.union = np.empty((n, bw), dtype=np.uint64)  # structures | masks
        self.stage = np.empty((n, bw), dtype=np.uint64)  # masks, when not word-aligned
        self.region = np.zeros((1, bw), dtype=np.uint64)
        self.scratch = np.empty((n, bw), dtype=np.uint64)  # output before the last operation
        self.vec = np.empty((5, bw), dtype=np.uint64)
        self._built: dict[int, tuple[list[Instr], W64, W64]] = {}

    def program(self, w: int) -> tuple[list[Instr], W64, W64]:
        """(calls, up, keep) for blocks of width w: out_i = (M_i | (S_i & up)) & keep.

        The calls start from S | M in `union` and the mask tree's first step (see `run`).
        """
        if w not in self._built:
            self._built[w] = self._build(w)
        return self._built[w]

    def _column(self, j: int, w: int) -> W64:
        a, b = self.cols[j] if j < len(self.cols) else (-1, None)  # beyond the tree: the zero row
        return self.tree[a:b, :, :w]

    def _build(self, w: int) -> tuple[list[Instr], W64, W64]:
        prog: list[Instr] = []
        for st in self.steps:
            col, up = self._column(st.col, w), self._column(st.col + 1, w)
            if st.from_input:  # the structure tree's first step; run() adds the mask tree's
                prog += _adder_calls(st, self.union[:, :w], col[:, 0], up[:, 0])
            else:
                prog += _adder_calls(st, col, col, up)
        voters = [self._column(j, w)[0, 0] for j in range(self.planes)]
        ones = [self._column(j, w)[0, 1] for j in range(self.planes)]
        allowed = self._at_least(prog, voters, w)
        gt, lt = self._compare(prog, ones, voters, w)
        if allowed is not True:
            prog += [(np.bitwise_and, (gt, allowed, gt)), (np.bitwise_and, (lt, allowed, lt))]
        prog.append((np.invert, (lt, lt)))
        return prog, gt, lt

    def _at_least(self, prog: list[Instr], voters: list[W64], w: int) -> W64 | bool:
        """voters >= threshold (a constant <= n), least significant plane first; then & region.

        True stands for "everywhere" and saves the calls.
        """
        ge: W64 | bool = True  # the empty prefix compares equal, so >=
        out = self.vec[4, :w]
        for j, v in enumerate(voters):
            if (self.threshold >> j) & 1:  # this bit must be set to stay >=
                if ge is not True:
                    prog.append((np.bitwise_and, (ge, v, out)))
                ge = v if ge is True else out
            elif ge is not True:  # a set bit here wins over the lower bits
                prog.append((np.bitwise_or, (ge, v, out)))
                ge = out
        if not self.has_region:
            return ge
        if ge is True:
            return self.region[0, :w]
        prog.append((np.bitwise_and, (ge, self.region[0, :w], out)))
        return out

    def _compare(self, prog: list[Instr], ones: list[W64], voters: list[W64], w: int) -> tuple[W64, W64]:
        """(2*ones > voters, 2*ones < voters), bit-sliced over the count planes.

        With voters = 2*q + r (r its lowest bit): 2*ones > voters iff ones > q, and
        2*ones < voters iff ones < q or (ones == q and r). ones > q is built least significant
        plane first (a differing plane overrides the verdict of the planes below it).
        """
        gt, ne, lt, diff = (self.vec[i, :w] for i in range(4))
        xor, band, bor = np.bitwise_xor, np.bitwise_and, np.bitwise_or
        for j in range(self.planes - 1):
            a, b = ones[j], voters[j + 1]  # plane j of ones and of q
            if j == 0:
                prog += [(xor, (a, b, ne)), (band, (a, ne, gt))]
                continue
            prog += [
                (xor, (a, b, diff)),
                (bor, (ne, diff, ne)),
                (xor, (gt, a, lt)),
                (band, (lt, diff, lt)),
                (xor, (gt, lt, gt)),  # lt: scratch here
            ]
        prog += [
            (xor, (ne, gt, lt)),
            (np.invert, (ne, ne)),  # lt = ones < q; ne = ones == q
            (band, (voters[0], ne, ne)),
            (bor, (lt, ne, lt)),
        ]
        return gt, lt

    def run(self, job: Job, w_start: int, w_stop: int) -> None:
        """Merge words [w_start, w_stop) of the job, block by block."""
        bw = self.stage.shape[1]
        first = self.steps[0]
        for w0 in range(w_start, w_stop, bw):
            w1 = min(w0 + bw, w_stop)
            w = w1 - w0
            # Count voters from S | M: equal to S exactly when the masks are valid, which one
            # comparison then checks (cheaper than copying S and checking separately).
            m = job.masks.view(w0, w1, self.stage)
            s = job.structures.load(w0, w1, self.union, m)
            if not job.structures.equal(w0, w1, s):
                raise_bad_row(int(bad_rows(job.structures.data, job.masks.data)[0]))
            if job.region is not None:
                job.region.load(w0, w1, self.region)
            prog, up, keep = self.program(w)
            for fn, args in _adder_calls(first, m, self._column(0, w)[:, 1], self._column(1, w)[:, 1]):
                fn(*args)
            for fn, args in prog:
                fn(*args)
            tmp = self.scratch[:, :w]
            np.bitwise_and(s, up, out=tmp)
            np.bitwise_or(tmp, m, out=tmp)
            o = job.out.target(w0, w1, tmp)
            np.bitwise_and(tmp, keep, out=o)  # the only pass over the (freshly allocated) output
            job.out.store(w0, w1, o)


class Words:
    """A packed (rows, nbytes) uint8 array seen as blocks of uint64 words, zero-padded past the end."""

    def __init__(self, data: U8) -> None:
        self.data = data
        self.nbytes = data.shape[1]
        aligned = data.flags.c_contiguous and self.nbytes % ALIGN == 0 and data.ctypes.data % ALIGN == 0
        self.words: W64 | None = data.view(np.uint64) if aligned else None

    def load(self, w0: int, w1: int, dst: W64, union: W64 | None = None) -> W64:
        """Words [w0, w1) of every row into `dst`, zero-padded past the end (OR-ed with `union`)."""
        w = w1 - w0
        out = dst[:, :w]
        if self.words is None:
            b0, b1 = w0 * ALIGN, min(w1 * ALIGN, self.nbytes)
            raw = dst.view(np.uint8)
            raw[:, : b1 - b0] = self.data[:, b0:b1]
            raw[:, b1 - b0 : w * ALIGN] = 0
            if union is not None:
                np.bitwise_or(out, union, out=out)
        elif union is None:
            np.copyto(out, self.words[:, w0:w1])
        else:
            np.bitwise_or(self.words[:, w0:w1], union, out=out)
        return out

    def view(self, w0: int, w1: int, stage: W64) -> W64:
        """Words [w0, w1) of every row: a view when aligned, else a copy in `stage`."""
        return self.words[:, w0:w1] if self.words is not None else self.load(w0, w1, stage)

    def equal(self, w0: int, w1: int, block: W64) -> bool:
        """Whether `block` holds exactly words [w0, w1) of the data."""
        if self.words is not None:
            return bool(np.array_equal(block, self.words[:, w0:w1]))
        b0, b1 = w0 * ALIGN, min(w1 * ALIGN, self.nbytes)
        raw = block.view(np.uint8)
        return bool(np.array_equal(raw[:, : b1 - b0], self.data[:, b0:b1])) and not raw[:, b1 - b0 :].any()

    def target(self, w0: int, w1: int, scratch: W64) -> W64:
        """Where to compute output words [w0, w1): straight into the data if aligned, else `scratch`."""
        return self.words[:, w0:w1] if self.words is not None else scratch[:, : w1 - w0]

    def store(self, w0: int, w1: int, block: W64) -> None:
        """Finish `target`: copy the scratch block into the data (nothing to do when aligned)."""
        if self.words is None:
            b0, b1 = w0 * ALIGN, min(w1 * ALIGN, self.nbytes)
            self.data[:, b0:b1] = block.view(np.uint8)[:, : b1 - b0]


class Job(NamedTuple):
    structures: Words
    masks: Words
    region: Words | None
    out: Words
