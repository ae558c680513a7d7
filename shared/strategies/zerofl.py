"""ZeroFL (Qiu et al., ICLR 2022) on SWAT as a strategy.

Device: loads the dense global weights, trains E epochs with SWAT (shared/strategies/swat.py: top-K
weights forward, top-K activations for dW, sp = `sparsity`, thresholds refreshed every `topk_period`
batches, first layer dense unless `sparsify_first`, last layer sparse), and uploads per tensor its top
K_u = ceil((1 - sp + mr) d) weights by magnitude, as values with positions (the "Top-K-Weights" variant).
Server: per entry, the sample-weighted mean over the devices, where an entry a device did not send
counts as `unsent`:
  "zero"     0 (the public re-implementation's FedAvgNZ: rarely-sent weights shrink towards 0)
  "holders"  left out: the mean over the devices that sent it (the previous value if none did)
  "keep"     the previous global value ("no change")
Downlink: the dense global model (float32, or float16 with value_dtype "f16").
Evaluation: the top-K forward of the sparse layers (the slides'); the dense weights' accuracy is
reported next to it (dense_eval_accuracy), as the re-implementation evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared.device import derive_seed
from shared.errors import CodecError
from shared.models import build_model
from shared.payloads import Part, dense_part, sparse_part
from shared.strategies.base import (
    DeviceHalf,
    ServerHalf,
    dense,
    get_tensor,
    load_dense,
    tensors,
    train_loop,
    version_of,
)
from shared.strategies.swat import SwatLinear, swat_layers
from shared.strategy_codec import StrategyMessage
from shared.train import evaluate

UNSENT_RULES = ("zero", "holders", "keep")


def upload_count(size: int, sparsity: float, mask_ratio: float) -> int:
    return min(size, math.ceil((1.0 - sparsity + mask_ratio) * size))


def top_weights(w: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest |w| (ties: the lower position), sorted."""
    order = np.argsort(-np.abs(w), kind="stable")
    return np.sort(order[:k])


def merge_sparse(prev: np.ndarray, sent: list[tuple[np.ndarray, np.ndarray, float]], rule: str) -> np.ndarray:
    """The new global tensor from (positions, values, samples) uploads under an unsent-entry rule."""
    if rule not in UNSENT_RULES:
        raise ValueError(f"unknown unsent rule {rule!r}; choose one of {UNSENT_RULES}")
    total = sum(n for _, _, n in sent)
    if total <= 0:
        return prev.copy()
    num = np.zeros(prev.size)
    held = np.zeros(prev.size)
    for pos, vals, n in sent:
        num[pos] += n * vals
        held[pos] += n
    if rule == "zero":
        out = num / total
    elif rule == "holders":
        out = np.where(held > 0, num / np.where(held > 0, held, 1.0), prev)
    else:
        out = (num + (total - held) * prev) / total
    return out.astype(np.float32)


class ZeroFLDevice(DeviceHalf):
    name = "zerofl"

    def prepare(self) -> None:
        super().prepare()
        self.swat: list[SwatLinear] = swat_layers(self.model.body, self.cfg.sparsity, self.cfg.topk_period,
                                                  self.cfg.sparsify_first)

    def apply(self, msg: StrategyMessage) -> None:
        load_dense(self.model, msg)
        self.version = msg.model

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self.apply(task)
        for layer in self.swat:
            layer.flops = layer.dense_flops = 0.0
            layer.batches = 0  # thresholds computed afresh on the received weights
        st = train_loop(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                        seed=derive_seed(self.seed, "round", task.round, self.device_id))
        self.last_stats = st
        parts: list[Part] = []
        for name, p in tensors(self.model):
            w = get_tensor(p)
            pos = top_weights(w, upload_count(w.size, self.cfg.sparsity, self.cfg.mask_ratio))
            parts.append(sparse_part(name, w.size, pos, w[pos], self.cfg.value_dtype))
        return self.update(task, parts, st, sum(layer.flops for layer in self.swat),
                           sum(layer.dense_flops for layer in self.swat))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """With only the top-K weights of the sparse layers in the forward pass, as the model was
        trained and as the ZeroFL slides evaluate (evaluate_dense: the re-implementation's way)."""
        for layer in self.swat:
            layer.eval_topk = True
        try:
            return evaluate(self.model, x, y)
        finally:
            for layer in self.swat:
                layer.eval_topk = False

    def evaluate_dense(self, x: np.ndarray, y: np.ndarray) -> float:
        return evaluate(self.model, x, y)[1]


class ZeroFLServer(ServerHalf):
    name = "zerofl"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.cfg.unsent not in UNSENT_RULES:
            raise ValueError(f"unknown unsent rule {self.cfg.unsent!r}; choose one of {UNSENT_RULES}")
        model = build_model(dense(self.spec))
        self.names = [n for n, _ in tensors(model)]
        self.w = [get_tensor(p) for _, p in tensors(model)]
        self.version = version_of(0, self.w)

    def _parts(self) -> list[Part]:
        return [dense_part(n, w, self.cfg.value_dtype) for n, w in zip(self.names, self.w, strict=True)]

    def task_params(self) -> dict[str, bool | int | float]:
        return {"sparsity": self.cfg.sparsity, "mask_ratio": self.cfg.mask_ratio}

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        if not updates:
            return {}
        for i, name in enumerate(self.names):
            sent = []
            for d in sorted(updates):
                part = updates[d].part(name)
                if part.enc != "sparse" or part.n != self.w[i].size or part.dtype == "none":
                    raise CodecError("bad_value", f"{name}: expected values with positions over {self.w[i].size}")
                if part.k is not None and part.k > upload_count(part.n, self.cfg.sparsity, self.cfg.mask_ratio):
                    raise CodecError("bad_value", f"{name}: {part.k} entries, more than the top-K upload")
                sent.append((part.positions(), part.array().astype(np.float64),
                             float(updates[d].stats.get("samples", 0))))
            self.w[i] = merge_sparse(self.w[i], sent, self.cfg.unsent)
        self.version = version_of(round_id, self.w)
        return {}
