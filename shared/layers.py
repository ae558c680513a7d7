"""Masked layers: frozen weights W, real-valued scores S, a fixed structure, mask M in {0,1}.

y = (M * W) x. Scores train through the sigmoid (paper Eq. 6-8); transmission and inference use
M = 1[sigmoid(S) >= 0.5] = 1[S >= 0]. Elements outside the device's structure are 0 forever.
A layer can also run "dense" (W trainable, no mask) so baselines use the very same architecture.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_MODES = ("ste", "sigmoid", "bernoulli")


class _SigmoidSTE(torch.autograd.Function):
    """Forward: the hard 0.5 threshold used on the wire; backward: the sigmoid's derivative (Eq. 7-8)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scores,) = ctx.saved_tensors
        sig = torch.sigmoid(scores / ctx.temperature)
        return grad * sig * (1 - sig) / ctx.temperature, None


def _bernoulli_ste(scores: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """FedPM's stochastic mask: forward m ~ Bernoulli(sigmoid(S / T)), drawn afresh at every call;
    backward straight through to the probability (dm/dp = 1), then the sigmoid's derivative."""
    p = torch.sigmoid(scores / temperature)
    m = torch.bernoulli(p.detach(), generator=generator)
    return m + p - p.detach()


class MaskedTensor(nn.Module):
    """One frozen weight tensor and the scores that choose which of its elements are on.

    `kind` says how the structured-sparsity groups are formed: "fc" (rows, columns), "conv"
    (filters, channels) or "none" (no group penalty, e.g. embeddings).
    """

    def __init__(self, name: str, weight: np.ndarray, scores: np.ndarray, layer_index: int,
                 kind: str, dense: bool = False) -> None:
        super().__init__()
        self.name = name
        self.layer_index = layer_index
        self.kind = kind
        self.dense = dense
        self.personal = False  # a personal head: dense, trained on the device, outside the wire layout
        w = torch.from_numpy(np.array(weight, dtype=np.float32))
        self.weight: Tensor
        if dense:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        self.scores = nn.Parameter(torch.from_numpy(np.array(scores, dtype=np.float32)), requires_grad=not dense)
        self.structure: Tensor
        self.register_buffer("structure", torch.ones_like(w, dtype=torch.bool))
        self.mode = "ste"
        self.temperature = 1.0
        self.generator: torch.Generator | None = None  # seeds "bernoulli" draws (set by local_train)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def soft_mask(self) -> Tensor:
        """sigmoid(S / T) inside the structure: the differentiable mask the regularizer sees."""
        return torch.sigmoid(self.scores / self.temperature) * self.structure

    def binary_mask(self) -> Tensor:
        return (self.scores >= 0) & self.structure

    def effective_weight(self) -> Tensor:
        if self.dense:
            return self.weight
        if not self.training:
            return self.weight * self.binary_mask()
        if self.mode == "ste":
            m: Tensor = _SigmoidSTE.apply(self.scores, self.temperature)  # type: ignore[no-untyped-call]
        elif self.mode == "sigmoid":
            m = torch.sigmoid(self.scores / self.temperature)
        elif self.mode == "bernoulli":
            m = _bernoulli_ste(self.scores, self.temperature, self.generator)
        else:
            raise ValueError(f"unknown mask mode {self.mode!r}; choose one of {MASK_MODES}")
        return self.weight * m * self.structure

    def group_lasso(self) -> Tensor:
        """Eq. 9: sum of group L2 norms of the soft mask, each scaled by sqrt(group size)."""
        if self.kind == "none" or self.dense:
            return self.scores.new_zeros(())
        m = self.soft_mask()
        # eps inside the root: a group the structure empties has norm 0, where sqrt's gradient is NaN.
        eps = 1e-12
        if self.kind == "conv":
            m = m.flatten(2)  # (out, in, k*k): filters over dims (1,2), channels over dims (0,2)
            filters = (m.pow(2).sum(dim=(1, 2)) + eps).sqrt().sum() * math.sqrt(m.shape[1] * m.shape[2])
            channels = (m.pow(2).sum(dim=(0, 2)) + eps).sqrt().sum() * math.sqrt(m.shape[0] * m.shape[2])
            return filters + channels
        rows = (m.pow(2).sum(dim=1) + eps).sqrt().sum() * math.sqrt(m.shape[1])
        cols = (m.pow(2).sum(dim=0) + eps).sqrt().sum() * math.sqrt(m.shape[0])
        return rows + cols


class MaskedLinear(nn.Module):
    def __init__(self, masked: MaskedTensor) -> None:
        super().__init__()
        self.masked = masked

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked.effective_weight())


class MaskedConv2d(nn.Module):
    def __init__(self, masked: MaskedTensor, padding: int = 0) -> None:
        super().__init__()
        self.masked = masked
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.masked.effective_weight(), padding=self.padding)


class MaskedEmbedding(nn.Module):
    def __init__(self, masked: MaskedTensor) -> None:
        super().__init__()
        self.masked = masked

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.masked.effective_weight())


GATES = ("i", "f", "g", "o")


class MaskedLSTMLayer(nn.Module):
    """One LSTM layer whose gates use masks over frozen weights, except `real_gate`.

    The paper (Sec. 3.5, Table 3) found masking all four gates costs accuracy; one gate's
    weights stay real-valued and are trained directly. They are kept on the device (never sent),
    so they are part of its personalization, as are the real-valued gate biases.
    """

    def __init__(self, masked_ih: MaskedTensor, masked_hh: MaskedTensor, real_ih: np.ndarray,
                 real_hh: np.ndarray, hidden: int, real_gate: str) -> None:
        super().__init__()
        if real_gate not in GATES:
            raise ValueError(f"real_gate must be one of {GATES}, got {real_gate!r}")
        self.masked_ih = masked_ih
        self.masked_hh = masked_hh
        self.real_ih = nn.Parameter(torch.from_numpy(real_ih.copy()))
        self.real_hh = nn.Parameter(torch.from_numpy(real_hh.copy()))
        bias = torch.zeros(4 * hidden)
        bias[hidden:2 * hidden] = 1.0  # forget-gate bias 1: the usual remedy for early vanishing memory
        self.bias = nn.Parameter(bias)
        self.hidden = hidden
        self.real_index = GATES.index(real_gate)

    def _gate_weights(self) -> tuple[Tensor, Tensor]:
        """Assemble (4H, in) and (4H, H) in i, f, g, o order with the real gate in its slot."""
        h = self.hidden
        mih, mhh = self.masked_ih.effective_weight(), self.masked_hh.effective_weight()
        k = self.real_index
        w_ih = torch.cat([mih[: k * h], self.real_ih, mih[k * h:]], dim=0)
        w_hh = torch.cat([mhh[: k * h], self.real_hh, mhh[k * h:]], dim=0)
        return w_ih, w_hh

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, time, in) -> (batch, time, hidden)."""
        w_ih, w_hh = self._gate_weights()
        b, t, _ = x.shape
        pre = F.linear(x, w_ih, self.bias)  # input projections for all steps at once
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        outs = []
        for step in range(t):
            gates = pre[:, step] + F.linear(h, w_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1)
