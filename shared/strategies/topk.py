"""Top-k as a strategy: FedAvg (shared/strategies/fedavg.py) whose uplink is each device's k largest
update entries by magnitude, k = topk_fraction of the trained weights, with error feedback: what a
device did not send, and the rounding of what it did, is added to its next update (Stich et al. 2018).

sparsify() and topk_count() are the arithmetic of shared/sim/baselines.py's topk too, so a run through
this interface gives the baseline's accuracies exactly (tests/unit/test_baseline_strategies.py). The
update is taken against the float32 model the device was sent (it holds nothing else), and the values
are rounded to the wire's dtype before the residual is formed, so what the server adds is exactly
what travelled.

Wire: FedAvg's dense downlink (a task carries the global model to a device whose copy is stale); the
update is one sparse part per trained tensor: positions (a bitmap or an index list, whichever is
smaller: shared/payloads.sparse_part) and values; the parts' counts sum to k. The server refuses, with
a CodecError reason, an update trained from another version than the current one (stale_base: a delta
only means something against the weights it was taken from), a missing or unknown tensor, a part of
another encoding or size (bad_value), a total count other than k (bad_length), and positions or
values the codec would refuse (checked again here: a part built in-process was never decoded).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.device import derive_seed
from shared.errors import CodecError
from shared.payloads import DTYPES, Part, sparse_part
from shared.strategies.base import get_tensor, set_tensor, trained_tensors, version_of
from shared.strategies.fedavg import FedAvgDevice, FedAvgServer, train_flops
from shared.strategy_codec import StrategyMessage
from shared.train import local_train

NAME = "topk"


def topk_count(fraction: float, params: int) -> int:
    """Entries per update: at least one, at most every weight (a fraction past 1 sends them all)."""
    return max(1, min(params, int(fraction * params)))


def sparsify(delta: np.ndarray, residual: np.ndarray, k: int,
             dtype: str = "f32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions ascending, their values as sent: float32 of `dtype`, the new residual) of the k
    largest entries of delta + residual by magnitude; the residual (float64) keeps everything else
    and the rounding of what is sent."""
    full = np.asarray(delta, np.float64) + residual
    keep = np.sort(np.argpartition(np.abs(full), -k)[-k:])
    sent = full[keep].astype(DTYPES[dtype]).astype(np.float32)
    rest = full.copy()
    rest[keep] -= sent
    return keep, sent, rest


class TopKDevice(FedAvgDevice):
    name = NAME

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Error feedback: what this device has not sent yet (float64, one entry per trained weight).
        # Sized in prepare(); a board's saved state restores it (worker/strategy_runtime.py).
        self.residual = np.zeros(0)

    def prepare(self) -> None:
        super().prepare()
        if self.residual.size == 0:
            self.residual = np.zeros(sum(p.numel() for _, p in trained_tensors(self.model)))

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self._load(task)
        params = trained_tensors(self.model)
        start = [get_tensor(p) for _, p in params]
        st = local_train(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                         seed=derive_seed(self.seed, "round", task.round, self.device_id))
        self.last_stats = st
        delta = np.concatenate([get_tensor(p) for _, p in params]).astype(np.float64) - np.concatenate(start)
        keep, sent, self.residual = sparsify(delta, self.residual, topk_count(self.cfg.topk_fraction, delta.size),
                                             self.cfg.value_dtype)
        parts, offset = [], 0
        for (name, param), before in zip(params, start, strict=True):
            lo, hi = np.searchsorted(keep, [offset, offset + before.size])
            parts.append(sparse_part(name, before.size, keep[lo:hi] - offset, sent[lo:hi], self.cfg.value_dtype))
            offset += before.size
            # Back to the model it was sent: a task naming that version again (no parts) trains from it.
            set_tensor(param, before)
        flops = train_flops(self.model, st.samples * self.cfg.local_epochs)
        return self.update(task, parts, st, flops, flops)


class TopKServer(FedAvgServer):
    name = NAME

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.k = topk_count(self.cfg.topk_fraction, int(self.w.size))

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        deltas, weights = [], []
        for d in sorted(updates):  # the baseline's order: sampled devices are sorted
            msg = updates[d]
            deltas.append(self._delta(msg))
            weights.append(int(msg.stats.get("samples", 0)))
        if deltas and sum(weights) > 0:
            self.w = self.w + np.average(np.stack(deltas), axis=0, weights=np.asarray(weights, float))
            self.version = version_of(round_id, [self.w])
        return {}

    def _delta(self, msg: StrategyMessage) -> np.ndarray:
        """The update as a dense float32 vector; CodecError (with its reason) for anything malformed."""
        if msg.model != self.version:
            raise CodecError("stale_base", f"{msg.device} trained from {msg.model[:16]}, not {self.version[:16]}")
        if unknown := sorted({p.name for p in msg.parts} - set(self.names)):
            raise CodecError("unknown_field", f"part {unknown[0][:32]} is no tensor of this model")
        out = np.zeros(self.w.size, np.float32)
        offset = sent = 0
        for name, n in zip(self.names, self.sizes, strict=True):
            pos, values = _entries(msg.part(name), n)
            out[offset + pos] = values
            offset, sent = offset + n, sent + pos.size
        if sent != self.k:
            raise CodecError("bad_length", f"{msg.device} sent {sent} entries; a {NAME} update has {self.k}")
        return out


def _entries(part: Part, n: int) -> tuple[np.ndarray, np.ndarray]:
    if part.enc != "sparse" or part.n != n or part.dtype not in DTYPES:
        raise CodecError("bad_value", f"{part.name}: expected sparse values of a {n}-element tensor")
    pos, values = part.positions(), part.array()
    if pos.size != part.k or values.size != part.k:
        raise CodecError("bad_length", f"{part.name}: {pos.size} positions and {values.size} values for k={part.k}")
    if pos.size and (pos[0] < 0 or pos[-1] >= n or np.any(np.diff(pos) <= 0)):
        raise CodecError("bad_value", f"{part.name}: positions not strictly increasing in 0..{n - 1}")
    if not np.isfinite(values).all():
        raise CodecError("bad_value", f"{part.name}: a value is not finite")
    return pos, values
