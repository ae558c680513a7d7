"""BNN-FedAvg (the FedMask paper's baseline: FedAvg over a binary network, BinaryConnect/BinaryNet [25]).

Device: keeps latent real weights; every batch runs forward and backward through binary weights
s * sign(w) (s: the layer's mean |w|, XNOR-Net's per-layer scale, with bnn_scale; 1 without, as in
BinaryNet, which has batch norm to keep activations in range; this MLP has none), the gradient passes
straight through to the latent weights (STE, zeroed where |w| > 3 s, or > 1 unscaled: BinaryNet's cancellation),
and the optimizer updates the latent ones. Upload: per tensor, sign(w) as packed bits (1 bit/param)
and s as one float32.
Server: the paper says only that binary parameters travel both ways and devices map real to binary
before sending and back after receiving. So the server averages what it receives, the +-1 signs
(sample-weighted, FedAvg's rule), and binarises the mean before sending: a majority vote per weight
(a tie keeps the previous sign); s is the sample-weighted mean of the uploaded scales.
Downlink: the same bits + scale; a device's latent weights restart at s * sign.
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
from shared.payloads import Part, bits_part, dense_part
from shared.strategies.base import (
    DeviceHalf,
    ServerHalf,
    dense,
    dense_train_flops,
    get_tensor,
    linear_sizes,
    set_tensor,
    tensors,
    version_of,
)
from shared.strategy_codec import StrategyMessage
from shared.train import TrainStats

MAX_SCALE = 100.0  # a layer scale above this is refused: kaiming-uniform MLP weights have mean |w| < 1


def scale_of(w: np.ndarray, use_scale: bool) -> float:
    return float(np.abs(w).mean()) if use_scale and w.size else 1.0


def binarize(w: np.ndarray, scale: float) -> np.ndarray:
    return np.where(w >= 0, scale, -scale).astype(np.float32)


class _BinaryForward:
    """Swaps each tensor's latent weights for their binary form around a batch (BinaryConnect:
    forward/backward on binary weights, the gradient then applied to the latent ones)."""

    def __init__(self, model: MaskedNet, use_scale: bool) -> None:
        self.params = [p for _, p in tensors(model)]
        self.use_scale = use_scale
        self.latent: list[torch.Tensor] = []

    def binary(self) -> None:
        with torch.no_grad():
            self.latent = [p.detach().clone() for p in self.params]
            for p in self.params:
                s = p.abs().mean() if self.use_scale else torch.tensor(1.0)
                p.copy_(torch.where(p >= 0, s, -s))

    def latent_back(self) -> None:
        with torch.no_grad():
            for p, w in zip(self.params, self.latent, strict=True):
                if p.grad is not None:  # STE with BinaryNet's cancellation where the latent is beyond the clip
                    clip = w.abs().mean() * 3.0 if self.use_scale else torch.tensor(1.0)
                    p.grad.mul_((w.abs() <= clip).to(p.grad.dtype))
                p.copy_(w)


class BNNFedAvgDevice(DeviceHalf):
    name = "bnn-fedavg"

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self.apply(task)
        swap = _BinaryForward(self.model, self.cfg.bnn_scale)
        st = _binary_train(self, swap, task.round)
        self.last_stats = st
        parts: list[Part] = []
        for name, p in tensors(self.model):
            w = get_tensor(p)
            parts += [bits_part(name, w >= 0), dense_part(name + ":scale", [scale_of(w, self.cfg.bnn_scale)])]
        swap.binary()  # the device keeps (and evaluates) its binary model
        flops = _flops(self.model, st.samples * self.cfg.local_epochs)
        return self.update(task, parts, st, flops, flops)

    def apply(self, msg: StrategyMessage) -> None:
        for name, param in tensors(self.model):
            signs, scale = read_binary(msg, name, param.numel())
            set_tensor(param, binarize(signs, scale))
        self.version = msg.model


def _binary_train(dev: BNNFedAvgDevice, swap: _BinaryForward, round_id: int) -> TrainStats:
    """BinaryConnect's step: binary weights for forward and backward, the latent ones updated."""
    torch.set_num_threads(dev.cfg.train.threads)
    model, cfg = dev.model, dev.cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=cfg.weight_lr, momentum=cfg.momentum)
                                  if cfg.weight_optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.weight_lr))
    rng = np.random.Generator(np.random.PCG64(derive_seed(dev.seed, "round", round_id, dev.device_id)))
    xt, yt = torch.from_numpy(dev.x), torch.from_numpy(dev.y)
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    model.train()
    for _ in range(dev.cfg.local_epochs):
        order = torch.from_numpy(rng.permutation(len(dev.y)))
        for lo in range(0, len(dev.y), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            swap.binary()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            swap.latent_back()
            opt.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(idx), seen + len(idx)
    model.eval()
    return TrainStats(samples=len(dev.y), loss=loss_sum / max(seen, 1), accuracy=0.0,
                      seconds=time.perf_counter() - start)


def read_binary(msg: StrategyMessage, name: str, n: int) -> tuple[np.ndarray, float]:
    """(signs as +-1, scale) of one tensor; anything but n bits and one finite positive scale is refused."""
    bits = msg.part(name)
    if bits.enc != "bits" or bits.n != n:
        raise CodecError("bad_value", f"{name}: expected {n} sign bits")
    sp = msg.part(name + ":scale")
    if sp.enc != "dense" or sp.n != 1:
        raise CodecError("bad_value", f"{name}:scale: expected one value")
    scale = float(sp.array()[0])
    if not (np.isfinite(scale) and 0.0 < scale <= MAX_SCALE):
        raise CodecError("bad_value", f"{name}:scale: {scale} outside (0, {MAX_SCALE}]")
    return np.where(bits.bits(), 1.0, -1.0), scale


class BNNFedAvgServer(ServerHalf):
    name = "bnn-fedavg"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        model = build_model(dense(self.spec))
        self.names = [n for n, _ in tensors(model)]
        init = [get_tensor(p) for _, p in tensors(model)]
        self.signs = [np.where(w >= 0, 1.0, -1.0) for w in init]
        self.scales = [scale_of(w, self.cfg.bnn_scale) for w in init]
        self.version = version_of(0, self.signs)

    def _parts(self) -> list[Part]:
        out: list[Part] = []
        for name, s, c in zip(self.names, self.signs, self.scales, strict=True):
            out += [bits_part(name, s > 0), dense_part(name + ":scale", [c])]
        return out

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        order = sorted(updates)
        weights = np.asarray([float(updates[d].stats.get("samples", 0)) for d in order])
        if not order or weights.sum() <= 0:
            return {}
        read = [[read_binary(updates[d], name, s.size) for d in order]
                for name, s in zip(self.names, self.signs, strict=True)]  # all checked before any change
        for i, per_device in enumerate(read):
            mean = np.average(np.stack([signs for signs, _ in per_device]), axis=0, weights=weights)
            self.signs[i] = np.where(mean > 0, 1.0, np.where(mean < 0, -1.0, self.signs[i]))
            self.scales[i] = float(np.average([c for _, c in per_device], weights=weights))
        self.version = version_of(round_id, [*self.signs, np.asarray(self.scales)])
        return {}


def _flops(model: MaskedNet, samples: int) -> float:
    try:
        return dense_train_flops(linear_sizes(model), samples)
    except ValueError:
        return 0.0
