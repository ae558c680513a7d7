"""LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally") as a strategy: each device keeps its
own representation layers (never sent) and shares the global head, the last `head_layers` tensors,
which the server averages FedAvg-style (sample-weighted). A personalised strategy: each device is
evaluated with its own layers and the latest head.

Wire: down, the head as dense parts (when the device's copy is stale); up, the trained head.
"""

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
    load_dense,
    tensors,
    version_of,
)
from shared.strategy_codec import StrategyMessage
from shared.train import local_train


def head_names(names: list[str], head_layers: int) -> list[str]:
    if not 1 <= head_layers <= len(names):
        raise ValueError(f"head_layers must be in 1..{len(names)}, got {head_layers}")
    return names[-head_layers:]


class LGFedAvgDevice(DeviceHalf):
    name = "lg-fedavg"

    def prepare(self) -> None:
        super().prepare()
        self.head = head_names([n for n, _ in tensors(self.model)], self.cfg.head_layers)

    def apply(self, msg: StrategyMessage) -> None:
        load_dense(self.model, msg, frozenset(self.head))
        self.version = msg.model

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self.apply(task)
        st = local_train(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                         seed=derive_seed(self.seed, "round", task.round, self.device_id))
        self.last_stats = st
        parts = [dense_part(n, get_tensor(p), self.cfg.value_dtype) for n, p in tensors(self.model) if n in self.head]
        try:
            flops = dense_train_flops(linear_sizes(self.model), st.samples * self.cfg.local_epochs)
        except ValueError:
            flops = 0.0
        return self.update(task, parts, st, flops, flops)


class LGFedAvgServer(ServerHalf):
    name = "lg-fedavg"
    global_model = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        model = build_model(dense(self.spec))
        self.names = head_names([n for n, _ in tensors(model)], self.cfg.head_layers)
        self.w = [get_tensor(p) for n, p in tensors(model) if n in self.names]
        self.version = version_of(0, self.w)

    def _parts(self) -> list[Part]:
        return [dense_part(n, w, self.cfg.value_dtype) for n, w in zip(self.names, self.w, strict=True)]

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        weights = np.asarray([float(updates[d].stats.get("samples", 0)) for d in sorted(updates)])
        if not updates or weights.sum() <= 0:
            return {}
        for i, name in enumerate(self.names):
            stack = []
            for d in sorted(updates):
                part = updates[d].part(name)
                if part.enc != "dense" or part.n != self.w[i].size:
                    raise CodecError("bad_value", f"{name}: expected {self.w[i].size} dense values")
                stack.append(part.array())
            self.w[i] = np.average(np.stack(stack), axis=0, weights=weights).astype(np.float32)
        self.version = version_of(round_id, self.w)
        return {}
