"""FedAvg as a strategy: devices train the dense weights from the global model and upload them
(float32, every trained tensor: base.trained_tensors, the char LSTM's real-valued gates and biases
too); the server adds the sample-weighted mean of (uploaded - global) to the global weights. The
arithmetic is shared/sim/baselines.py's, in the same order, so a run through this interface gives
the baseline's accuracies exactly (tests/unit/test_strategies.py checks it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.device import derive_seed
from shared.errors import CodecError
from shared.models import build_model
from shared.payloads import Part, dense_part
from shared.strategies.base import (
    DeviceHalf,
    ServerHalf,
    dense,
    dense_train_flops,
    get_tensor,
    linear_sizes,
    set_tensor,
    trained_tensors,
    version_of,
)
from shared.strategy_codec import StrategyMessage
from shared.train import local_train


class FedAvgDevice(DeviceHalf):
    name = "fedavg"

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self._load(task)
        st = local_train(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                         seed=derive_seed(self.seed, "round", task.round, self.device_id))
        self.last_stats = st
        parts = [dense_part(n, get_tensor(p), self.cfg.value_dtype) for n, p in trained_tensors(self.model)]
        flops = train_flops(self.model, st.samples * self.cfg.local_epochs)
        return self.update(task, parts, st, flops, flops)

    def apply(self, msg: StrategyMessage) -> None:
        self._load(msg)

    def _load(self, msg: StrategyMessage) -> None:
        for name, param in trained_tensors(self.model):
            set_tensor(param, _dense(msg, name, param.numel()))
        self.version = msg.model


class FedAvgServer(ServerHalf):
    name = "fedavg"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        model = build_model(dense(self.spec))
        params = trained_tensors(model)
        self.names = [n for n, _ in params]
        self.sizes = [p.numel() for _, p in params]
        self.w = np.concatenate([get_tensor(p) for _, p in params])  # float64 after round 1, as baselines
        self.version = version_of(0, [self.w])

    def _parts(self) -> list[Part]:
        out, offset = [], 0
        for name, n in zip(self.names, self.sizes, strict=True):
            out.append(dense_part(name, self.w[offset:offset + n], self.cfg.value_dtype))
            offset += n
        return out

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        deltas, weights = [], []
        for d in sorted(updates):
            msg = updates[d]
            w = np.concatenate([_dense(msg, name, n) for name, n in zip(self.names, self.sizes, strict=True)])
            deltas.append(w - self.w)
            weights.append(int(msg.stats.get("samples", 0)))
        if deltas and sum(weights) > 0:
            self.w = self.w + np.average(np.stack(deltas), axis=0, weights=np.asarray(weights, float))
            self.version = version_of(round_id, [self.w])
        return {}


def _dense(msg: StrategyMessage, name: str, n: int) -> np.ndarray:
    part = msg.part(name)
    if part.enc != "dense" or part.n != n:
        raise CodecError("bad_value", f"{name}: expected {n} dense values")
    return part.array()


def train_flops(model: object, samples: int) -> float:
    """Dense training's FLOPs for `samples` (base.dense_train_flops); 0 for an arch it does not count."""
    try:
        return dense_train_flops(linear_sizes(model), samples)  # type: ignore[arg-type]
    except ValueError:
        return 0.0  # not an MLP: not counted
