"""FedDST (Bibikar et al., AAAI 2022) as a strategy: the real weights of a sparse network.

Server: the global sparse model starts as the dense init magnitude-pruned per layer to the densities
of `density_rule` ("erk": RigL's Erdos-Renyi-Kernel, layers that would exceed density 1 kept dense and
the rest rescaled; "uniform": 1 - S everywhere). Each round it averages every weight over the clients
that kept it (sample-weighted), takes the union of their masks and magnitude-prunes each layer back
to its density (ties, e.g. freshly grown zeros, go to the entries more samples voted for).

Device: loads (w, m), trains E epochs re-applying the mask after every optimizer step, and in a
readjustment round (the task says so, with the annealed alpha) drops the fraction alpha of its active
weights with the smallest |w| and grows as many entries that were inactive, by the largest |gradient|
of the loss over its whole local set; grown entries start at 0. Readjustment rounds: (r - 1) %
R_adj == 0 while alpha_t = alpha/2 (1 + cos(pi t / T_end)) > 0, t = r - 1, T_end = anneal_end x rounds.

The reference code's traps, avoided (each has a test in tests/unit/test_feddst.py): readjustment is
decided per round by the server, not by a lifetime epoch counter (it fires with any E); the annealed
alpha is the one used; growth picks only inactive entries; logits go to the cross-entropy without a
softmax; clients are sampled without replacement (shared/rounds.sample_devices).

Wire: down, per tensor one sparse part (mask positions + values in mask order). Up, per tensor its
kept values in mask order (dense part of k values: the server knows the mask), plus, in readjustment
rounds only, `<name>.flip`: the positions where the mask changed from the received one.
FLOPs are counted as a sparse kernel would spend them: forward and dX over the active weights, dW at
the active entries only, plus one dense-gradient pass over the local set in readjustment rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from shared.device import derive_seed
from shared.errors import CodecError
from shared.models import build_model
from shared.payloads import Part, dense_part, sparse_part
from shared.strategies.base import (
    DeviceHalf,
    ServerHalf,
    StrategyConfig,
    dense,
    dense_train_flops,
    get_tensor,
    set_tensor,
    tensors,
    train_loop,
    version_of,
)
from shared.strategy_codec import StrategyMessage


def layer_densities(sizes: list[tuple[int, int]], sparsity: float, rule: str) -> list[float]:
    """Per-layer density (1 - s_l) for (fan_out, fan_in) layers so that the total density is 1 - S."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    counts = [o * i for o, i in sizes]
    if rule == "uniform":
        return [1.0 - sparsity] * len(sizes)
    if rule != "erk":
        raise ValueError(f"unknown density rule {rule!r}; choose erk or uniform")
    raw = [(o + i) / (o * i) for o, i in sizes]
    dense_layers: set[int] = set()
    while True:  # RigL: scale the raw densities; a layer past 1 stays dense and the rest are rescaled
        budget = (1.0 - sparsity) * sum(counts) - sum(counts[j] for j in dense_layers)
        scale = budget / sum(raw[j] * counts[j] for j in range(len(sizes)) if j not in dense_layers)
        over = [j for j in range(len(sizes)) if j not in dense_layers and raw[j] * scale > 1.0]
        if not over:
            return [1.0 if j in dense_layers else raw[j] * scale for j in range(len(sizes))]
        dense_layers.update(over)


def annealed_alpha(alpha: float, t: int, t_end: float) -> float:
    """RigL's cosine decay: alpha at t = 0, 0 from t_end on."""
    if t_end <= 0 or t >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def readjust_params(cfg: StrategyConfig, round_id: int, rounds: int) -> tuple[bool, float]:
    t = round_id - 1
    a = annealed_alpha(cfg.alpha, t, cfg.anneal_end * rounds)
    return (cfg.readjust_every > 0 and t % cfg.readjust_every == 0 and a > 0.0), a


def readjust_mask(w: np.ndarray, mask: np.ndarray, grad: np.ndarray, alpha: float) -> np.ndarray:
    """Drop round(alpha x active) active entries of smallest |w|; grow as many previously inactive
    entries of largest |grad|. Returns the new mask (same count of ones)."""
    active, inactive = np.flatnonzero(mask), np.flatnonzero(~mask)
    k = min(round(alpha * active.size), inactive.size)
    new = mask.copy()
    if k == 0:
        return new
    drop = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    grow = inactive[np.argsort(-np.abs(grad[inactive]), kind="stable")[:k]]
    new[drop] = False
    new[grow] = True
    return new


def _topk_mask(values: np.ndarray, keep: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    mask = np.zeros(values.size, bool)
    if keep <= 0:
        return mask
    key = np.abs(values) if tiebreak is None else np.abs(values).astype(np.float64)
    order = np.lexsort((-tiebreak, -key)) if tiebreak is not None else np.argsort(-key, kind="stable")
    mask[order[:keep]] = True
    return mask


class FedDSTDevice(DeviceHalf):
    name = "feddst"

    def prepare(self) -> None:
        super().prepare()
        self.masks = [np.ones(p.numel(), bool) for _, p in tensors(self.model)]
        self.readjustments = 0

    def apply(self, msg: StrategyMessage) -> None:
        for i, (name, param) in enumerate(tensors(self.model)):
            part = msg.part(name)
            if part.enc != "sparse" or part.n != param.numel() or part.dtype == "none":
                raise CodecError("bad_value", f"{name}: expected a sparse part of {param.numel()} entries")
            self.masks[i] = np.zeros(part.n, bool)
            self.masks[i][part.positions()] = True
            set_tensor(param, part.full())
        self.version = msg.model

    def train(self, task: StrategyMessage) -> StrategyMessage:
        if task.parts:
            self.apply(task)
        received = [m.copy() for m in self.masks]
        mtensors = [(p, torch.from_numpy(m.reshape(p.shape))) for (_, p), m in zip(tensors(self.model), self.masks,
                                                                                    strict=True)]

        def remask() -> None:
            with torch.no_grad():
                for p, m in mtensors:
                    p.mul_(m)

        remask()
        st = train_loop(self.model, self.x, self.y, self.cfg.local_epochs, self.cfg.train,
                        seed=derive_seed(self.seed, "round", task.round, self.device_id), after_step=remask)
        self.last_stats = st
        sizes = [m.size for m in self.masks]
        steps = st.samples * self.cfg.local_epochs
        flops = self._sparse_flops(steps)
        readjust = bool(task.params.get("readjust", False))
        if readjust:
            alpha = float(task.params["alpha"])
            grads = self.local_gradient()
            for i, (_, p) in enumerate(tensors(self.model)):
                w = get_tensor(p)
                self.masks[i] = readjust_mask(w, self.masks[i], grads[i], alpha)
                set_tensor(p, w * self.masks[i])  # dropped entries to 0; grown ones were 0 already
            nnz = [int(m.sum()) for m in received]  # forward and dX over the active weights, dW dense
            flops += st.samples * 2.0 * (2 * sum(nnz) - nnz[0] + sum(sizes))
            self.readjustments += 1
        parts: list[Part] = []
        for i, (name, p) in enumerate(tensors(self.model)):
            parts.append(dense_part(name, get_tensor(p)[self.masks[i]], self.cfg.value_dtype))
            if readjust:
                parts.append(sparse_part(f"{name}.flip", sizes[i], np.flatnonzero(self.masks[i] != received[i])))
        return self.update(task, parts, st, flops, dense_train_flops(sizes, steps))

    def local_gradient(self) -> list[np.ndarray]:
        """d(mean cross-entropy over the whole local set)/dW at every entry, active or not."""
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        xt, yt = torch.from_numpy(self.x), torch.from_numpy(self.y)
        for lo in range(0, len(self.y), 256):
            loss = F.cross_entropy(self.model(xt[lo:lo + 256]), yt[lo:lo + 256], reduction="sum") / len(self.y)
            loss.backward()  # type: ignore[no-untyped-call]
        self.model.eval()
        out = []
        for _, p in tensors(self.model):
            g = p.grad
            out.append(np.zeros(p.numel(), np.float32) if g is None else g.detach().numpy().reshape(-1).copy())
        self.model.zero_grad(set_to_none=True)
        return out

    def _sparse_flops(self, samples: int) -> float:
        nnz = [int(m.sum()) for m in self.masks]
        return float(samples) * 2.0 * (3 * sum(nnz) - nnz[0])


class FedDSTServer(ServerHalf):
    name = "feddst"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        model = build_model(dense(self.spec))
        self.names = [n for n, _ in tensors(model)]
        shapes = [tuple(p.shape) for _, p in tensors(model)]
        if any(len(s) != 2 for s in shapes):
            raise ValueError("FedDST here prunes Linear layers (the mlp arch)")
        self.densities = layer_densities([(s[0], s[1]) for s in shapes], self.cfg.sparsity, self.cfg.density_rule)
        self.keep = [round(dn * s[0] * s[1]) for dn, s in zip(self.densities, shapes, strict=True)]
        self.w = [get_tensor(p) for _, p in tensors(model)]
        self.m = [_topk_mask(w, k) for w, k in zip(self.w, self.keep, strict=True)]
        self.w = [w * m for w, m in zip(self.w, self.m, strict=True)]
        self.version = version_of(0, self.w)
        self.masks_at = {self.version: [m.copy() for m in self.m]}  # the masks devices may hold
        self.readjust_rounds: list[int] = []
        self.mask_moves: list[int] = []

    def _parts(self) -> list[Part]:
        return [sparse_part(n, w.size, np.flatnonzero(m), w[m], self.cfg.value_dtype)
                for n, w, m in zip(self.names, self.w, self.m, strict=True)]

    def task(self, round_id: int, device: str) -> StrategyMessage:
        readjust, alpha = readjust_params(self.cfg, round_id, self.rounds)
        if readjust and round_id not in self.readjust_rounds:
            self.readjust_rounds.append(round_id)
        stale = self.held.get(device) != self.version
        self.held[device] = self.version
        return StrategyMessage(type="stask", strategy=self.name, device=device, round=round_id, model=self.version,
                               parts=tuple(self._parts()) if stale else (),
                               params={"readjust": readjust, "alpha": alpha, "sparsity": self.cfg.sparsity})

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        votes = [np.zeros(w.size) for w in self.w]
        sums = [np.zeros(w.size) for w in self.w]
        for d in sorted(updates):
            msg = updates[d]
            base = self.masks_at.get(msg.model)
            if base is None:
                raise CodecError("stale_base", f"{d} trained from {msg.model}, a version the server no longer holds")
            n_k = float(msg.stats.get("samples", 0))
            for i, name in enumerate(self.names):
                mask = base[i].copy()
                if msg.has(f"{name}.flip"):
                    flip = msg.part(f"{name}.flip")
                    if flip.enc != "sparse" or flip.n != mask.size:
                        raise CodecError("bad_value", f"{name}.flip: expected positions over {mask.size} entries")
                    mask[flip.positions()] ^= True
                    if int(mask.sum()) != self.keep[i]:
                        raise CodecError("bad_value", f"{name}: the readjusted mask keeps {int(mask.sum())}, "
                                         f"not {self.keep[i]}")
                values = msg.part(name)
                if values.enc != "dense" or values.n != int(mask.sum()):
                    raise CodecError("bad_value", f"{name}: expected {int(mask.sum())} kept values")
                votes[i][mask] += n_k
                sums[i][mask] += n_k * values.array()
        if not updates:
            return {}
        moved = 0
        for i in range(len(self.w)):
            held = votes[i] > 0
            avg = np.where(held, sums[i] / np.where(held, votes[i], 1.0), 0.0)
            mask = held if held.sum() <= self.keep[i] else _topk_mask(avg, self.keep[i], tiebreak=votes[i])
            moved += int((mask & ~self.m[i]).sum())
            self.m[i], self.w[i] = mask, (avg * mask).astype(np.float32)
        self.mask_moves.append(moved)  # entries the global mask gained this round (as many were lost)
        self.version = version_of(round_id, self.w)
        self.masks_at = {v: m for v, m in self.masks_at.items() if v in set(self.held.values())}
        self.masks_at[self.version] = [m.copy() for m in self.m]
        return {}
