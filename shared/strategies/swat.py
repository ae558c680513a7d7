"""SWAT (Raihan and Aamodt, NeurIPS 2020) for Linear layers: sparse weights forward, sparse
activations for the weight gradient, every weight updated.

    forward   W_s = W * 1[|W| >= t_W]   (t_W: the K-th largest |W|, K = ceil((1 - sp) d))
              y   = x W_s^T
    backward  dx  = dy W_s              (sparse weights)
              dW  = dy^T x_s,  x_s = x * 1[|x| >= t_x]  (t_x: the K_x-th largest |x| of the batch)

The thresholds are cached and refreshed every `period` training batches (SWAT's topk_period; between
refreshes the cached value applies to the current tensors). The dense weights are kept: only the
forward/backward operands are sparse (the relogu re-implementation overwrote W, turning SWAT into
iterative pruning). FLOPs are counted from the operands' actual nonzeros; evaluation uses the dense
weights unless `eval_topk` is set (the ZeroFL slides evaluate with the top-K weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.layers import MaskedLinear, MaskedTensor


class _SwatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, w_keep: Tensor, x_keep: Tensor) -> Tensor:
        ws, xs = w * w_keep, x * x_keep
        ctx.save_for_backward(ws, xs)
        return F.linear(x, ws)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, None, None]:
        ws, xs = ctx.saved_tensors
        return dy @ ws, dy.t() @ xs, None, None


def kth_largest(values: Tensor, k: int) -> float:
    flat = values.detach().abs().reshape(-1)
    k = max(1, min(k, flat.numel()))
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


class SwatLinear(nn.Module):
    def __init__(self, masked: MaskedTensor, sparsity: float, period: int, first: bool) -> None:
        super().__init__()
        self.masked, self.sparsity, self.period, self.first = masked, sparsity, max(1, period), first
        self.eval_topk = False
        self.batches = 0
        self.t_w = self.t_x = 0.0
        self.flops = self.dense_flops = 0.0

    def forward(self, x: Tensor) -> Tensor:
        w = self.masked.weight
        if not self.training:
            if self.eval_topk and self.sparsity > 0:
                k = math.ceil((1 - self.sparsity) * w.numel())
                return F.linear(x, w * (w.detach().abs() >= kth_largest(w, k)))
            return F.linear(x, w)
        b, d = x.shape[0], w.numel()
        self.dense_flops += 2.0 * b * d * (2 if self.first else 3)  # forward, dW, dX (none for layer 1)
        if self.sparsity <= 0:
            self.flops += 2.0 * b * d * (2 if self.first else 3)
            return F.linear(x, w)
        if self.batches % self.period == 0:
            self.t_w = kth_largest(w, math.ceil((1 - self.sparsity) * d))
            self.t_x = kth_largest(x, math.ceil((1 - self.sparsity) * x.numel()))
        self.batches += 1
        w_keep = (w.detach().abs() >= self.t_w).to(w.dtype)
        x_keep = (x.detach().abs() >= self.t_x).to(x.dtype)
        nnz_w = float(w_keep.sum())
        nnz_x = float(((x.detach() * x_keep) != 0).sum())
        out_features = w.shape[0]
        self.flops += 2.0 * b * nnz_w * (1 if self.first else 2) + 2.0 * nnz_x * out_features
        y: Tensor = _SwatFn.apply(x, w, w_keep, x_keep)  # type: ignore[no-untyped-call]
        return y


def swat_layers(body: nn.Module, sparsity: float, period: int, sparsify_first: bool) -> list[SwatLinear]:
    """Replace every MaskedLinear in `body` (an nn.Sequential) by a SwatLinear over the same tensor:
    the first layer dense unless `sparsify_first`, every later one (the last too) at `sparsity`."""
    if not isinstance(body, nn.Sequential):
        raise ValueError("SWAT here wraps the mlp arch's Sequential body")
    out: list[SwatLinear] = []
    for i, module in enumerate(body):
        if isinstance(module, MaskedLinear):
            first = not out
            layer = SwatLinear(module.masked, 0.0 if first and not sparsify_first else sparsity, period, first)
            body[i] = layer
            out.append(layer)
    return out
