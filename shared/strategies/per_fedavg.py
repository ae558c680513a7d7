"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020), first-order variant (FO-MAML), as a strategy.

Device: from the global weights w, each local step takes two fresh batches D, D' of its own data:
  w_tmp = w - alpha * grad L_D(w)           (inner step, alpha = inner_lr)
  w     = w - beta  * grad L_D'(w_tmp)      (outer step, beta = outer_lr; first order: no Hessian term)
for local_epochs passes over the data (one step per two batches); uploads w (dense float32).
Server: the sample-weighted mean of the uploaded w (FedAvg's rule).
Evaluation: the method's personalisation. Each device takes the global w, one gradient step of size
alpha on one batch of its own training data, and is evaluated with the adapted weights (the global
weights without the step: `evaluate_unadapted`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from shared.device import derive_seed
from shared.errors import CodecError
from shared.models import MaskedNet, build_model
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
from shared.train import TrainStats, evaluate


def _grad_step(model: MaskedNet, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """w <- w - lr * grad of the mean cross-entropy on (x, y); returns the loss before the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)
    return float(loss.detach())


def fo_maml_train(model: MaskedNet, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, alpha: float,
                  beta: float, seed: int) -> TrainStats:
    """Per-FedAvg's local steps (first order): inner step on one batch, outer gradient at the
    inner point on the next batch, applied to the pre-inner weights."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.Generator(np.random.PCG64(seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start, loss_sum, steps = time.perf_counter(), 0.0, 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        for lo in range(0, len(y) - batch_size, 2 * batch_size):
            inner, outer = order[lo:lo + batch_size], order[lo + batch_size:lo + 2 * batch_size]
            saved = [p.detach().clone() for p in params]
            _grad_step(model, xt[inner], yt[inner], alpha)
            loss = F.cross_entropy(model(xt[outer]), yt[outer])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, w, g in zip(params, saved, grads, strict=True):
                    p.copy_(w - beta * g)
            loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
    model.eval()
    return TrainStats(samples=len(y), loss=loss_sum / max(steps, 1), accuracy=0.0,
                      seconds=time.perf_counter() - start)


class PerFedAvgDevice(DeviceHalf):
    name = "per-fedavg"

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self.apply(task)
        st = fo_maml_train(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train.batch_size,
                           self.cfg.inner_lr, self.cfg.outer_lr, derive_seed(self.seed, "round", task.round,
                                                                             self.device_id))
        self.last_stats = st
        parts = [dense_part(n, get_tensor(p), self.cfg.value_dtype) for n, p in tensors(self.model)]
        # each step: 2 forward+backward passes on 2 batches, i.e. the data once per epoch twice over
        flops = _flops(self.model, 2 * st.samples * self.cfg.local_epochs)
        return self.update(task, parts, st, flops, flops)

    def apply(self, msg: StrategyMessage) -> None:
        load_dense(self.model, msg)
        self.version = msg.model

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """After one alpha-step on one batch of this device's own training data (the weights are
        restored afterwards, so evaluating twice gives the same figure)."""
        if len(self.y) == 0:
            return evaluate(self.model, x, y)
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, "adapt", self.device_id)))
        idx = torch.from_numpy(rng.permutation(len(self.y))[:self.cfg.train.batch_size])
        try:
            self.model.train()
            _grad_step(self.model, torch.from_numpy(self.x)[idx], torch.from_numpy(self.y)[idx], self.cfg.inner_lr)
            self.model.eval()
            return evaluate(self.model, x, y)
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)

    def evaluate_unadapted(self, x: np.ndarray, y: np.ndarray) -> float:
        return evaluate(self.model, x, y)[1]


class PerFedAvgServer(ServerHalf):
    name = "per-fedavg"
    global_model = False  # one global model, but each device is evaluated after adapting it

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        model = build_model(dense(self.spec))
        self.names = [n for n, _ in tensors(model)]
        self.w = [get_tensor(p).astype(np.float64) for _, p in tensors(model)]
        self.version = version_of(0, self.w)

    def _parts(self) -> list[Part]:
        return [dense_part(n, w, self.cfg.value_dtype) for n, w in zip(self.names, self.w, strict=True)]

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        weights = np.asarray([float(updates[d].stats.get("samples", 0)) for d in sorted(updates)])
        if not updates or weights.sum() <= 0:
            return {}
        new = []
        for name, w in zip(self.names, self.w, strict=True):
            rows = []
            for d in sorted(updates):
                part = updates[d].part(name)
                if part.enc != "dense" or part.n != w.size:
                    raise CodecError("bad_value", f"{name}: expected {w.size} dense values")
                vals = part.array()
                if not np.isfinite(vals).all():
                    raise CodecError("bad_value", f"{name}: non-finite weights")
                rows.append(vals.astype(np.float64))
            new.append(np.average(np.stack(rows), axis=0, weights=weights))
        self.w = new
        self.version = version_of(round_id, self.w)
        return {}


def _flops(model: MaskedNet, samples: int) -> float:
    try:
        return dense_train_flops(linear_sizes(model), samples)
    except ValueError:
        return 0.0  # not an MLP: not counted
