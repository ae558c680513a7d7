"""Export a MaskedNet as a physically smaller dense model that predicts exactly like `net.eval()`.

In eval mode a MaskedNet computes with W * M. Structured sparsity (zeroed rows, columns, filters,
channels) means whole hidden units can be dropped without changing a single logit, because no
layer has a bias and ReLU(0) = maxpool(0) = 0:

* a unit whose incoming weights (from surviving units) are all zero always outputs 0;
* a unit whose outgoing weights (into surviving units) are all zero is never read.

Dropping one unit can make a neighbour droppable, so `_surviving` iterates to a fixed point.
Each removal only shrinks the sets the tests look at and "all zero over a set" stays true
on any subset, so removing everything the same sweep flags at once is as exact as removing one
unit at a time. Output classes always stay, so logits keep their shape and argmax is unchanged.

The exported model is a plain nn.Sequential (Linear/Conv2d without bias, ReLU, MaxPool2d) built
from a JSON-able op list plus named numpy arrays; `save_compact` writes exactly that (npz, no
pickle) and `load_compact` rebuilds it. char_lstm is not supported: its real-valued gate and
gate biases keep a unit alive even when all of its masked weights are zero.

Conventions: `params` counts the weight elements of the Linear/Conv2d layers (the int64 index of
kept input features, if any, is not counted). `flops` is 2 x multiply-accumulates per sample of
those layers only (ReLU, pooling and the input gather are not counted).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shared.layers import MaskedTensor
from shared.models import MaskedNet, _image_shape

FORMAT = "fedmask-compact/1"
_META_KEY = "__meta__"

# Gather the kept input features (index_select) only when at most this fraction of them survives.
# Measured on 1 thread, Linear(600 -> 256) vs index_select + Linear(k -> 256): the gather costs
# ~2.7 us at batch 1, where the smaller matmul only makes up for it once k <= ~0.6 * 600
# (0.75: 13.0 vs 11.3 us; 0.6: 11.2 vs 11.3 us); at batch 64 it pays from ~0.9 down
# (0.6: 124 vs 187 us). 0.6 never loses at either batch size.
GATHER_MAX_FRACTION = 0.6

Op = dict[str, Any]


@dataclass
class CompactModel:
    module: nn.Module
    params: int  # weight elements of the Linear/Conv2d layers
    flops: int  # 2 x MACs per sample, Linear/Conv2d only
    kept_units: dict[str, tuple[int, int]]  # "input" and each layer's output units: (kept, total)
    ops: list[Op] = field(repr=False)  # what save_compact writes; load_compact rebuilds from it
    arrays: dict[str, np.ndarray] = field(repr=False)


# -- analysis ---------------------------------------------------------------------------------
@dataclass
class _Chain:
    """The masked layers of an mlp/cnn as a chain of (out units, in units, trailing) weights."""

    arch: str
    names: list[str]
    weights: list[Tensor]  # effective eval weights W * M, original shapes
    units_in: int  # input features (mlp) or input channels (cnn)
    input_shape: tuple[int, ...]  # (d,) for mlp, (c, h, w) for cnn
    num_classes: int

    def grouped(self, i: int, units_in: int) -> Tensor:
        """Weight i as (out units, in units, rest): a cnn's fc1 columns group by conv2 channel."""
        w = self.weights[i]
        return w.reshape(w.shape[0], units_in, -1)


def _eval_weight(t: MaskedTensor) -> Tensor:
    """What the layer multiplies by in eval mode, asked of the layer itself so the rule lives there."""
    was = t.training
    t.train(False)
    try:
        with torch.no_grad():
            return t.effective_weight().detach().clone()
    finally:
        t.train(was)


def _chain(net: MaskedNet) -> _Chain:
    spec = net.spec
    if spec.arch not in ("mlp", "cnn"):
        raise NotImplementedError(
            f"compact export supports the 'mlp' and 'cnn' archs, not {spec.arch!r}: an LSTM unit "
            "stays alive through its real-valued gate and biases even when its masked weights are zero")
    masked = net.masked()
    if spec.arch == "mlp":
        shape: tuple[int, ...] = (int(np.prod(spec.input_shape)),)
    else:
        shape = _image_shape(spec.input_shape)
    return _Chain(spec.arch, [t.name for t in masked], [_eval_weight(t) for t in masked],
                  shape[0], shape, spec.num_classes)


def _connectivity(chain: _Chain) -> list[Tensor]:
    """Per layer, a bool (out units, in units) matrix: does unit in reach unit out at all?"""
    conn, units = [], chain.units_in
    for i, w in enumerate(chain.weights):
        conn.append((chain.grouped(i, units) != 0).any(dim=2))
        units = w.shape[0]
    return conn


def _surviving(conn: list[Tensor]) -> list[Tensor]:
    """Fixed point of unit removal. keep[0] = inputs, keep[1..L-1] = hidden, keep[L] = outputs."""
    keep = [torch.ones(conn[0].shape[1], dtype=torch.bool)]
    keep += [torch.ones(a.shape[0], dtype=torch.bool) for a in conn]
    while True:
        new = [keep[0] & conn[0][keep[1]].any(dim=0)]  # an input is needed if a kept unit reads it
        for b in range(1, len(conn)):
            fed = conn[b - 1][:, keep[b - 1]].any(dim=1)
            read = conn[b][keep[b + 1]].any(dim=0)
            new.append(keep[b] & fed & read)
        new.append(keep[-1])  # every class keeps its logit
        if all(torch.equal(a, b) for a, b in zip(new, keep, strict=True)):
            return keep
        keep = new


# -- building -------------------------------------------------------------------------------
def _collapsed(keep: list[Tensor]) -> bool:
    """A hidden layer lost every unit: no path reaches the output and every logit is 0.

    The fixed point then has emptied every hidden layer and the input too.
    """
    return any(not bool(k.any()) for k in keep[1:-1])


def _plan(chain: _Chain, keep: list[Tensor]) -> tuple[list[Op], dict[str, np.ndarray]]:
    """The op list and arrays of the model that keeps exactly the units in `keep`."""
    if _collapsed(keep):
        return [{"op": "zeros", "out": chain.num_classes}], {}
    ops: list[Op] = [{"op": "flatten"}]
    arrays: dict[str, np.ndarray] = {}
    if chain.arch == "cnn":
        ops.append({"op": "unflatten", "shape": list(chain.input_shape)})
    if not bool(keep[0].all()):
        arrays["select"] = keep[0].nonzero().flatten().numpy()
        ops.append({"op": "select", "dim": 1, "array": "select"})
    last = len(chain.weights) - 1
    for i, name in enumerate(chain.names):
        w = chain.grouped(i, keep[i].numel())[keep[i + 1]][:, keep[i]]
        kernel = chain.weights[i].shape[2:]  # () for a linear layer
        w = w.reshape(*w.shape[:2], *kernel) if kernel else w.reshape(w.shape[0], -1)
        arrays[name] = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        if w.dim() == 4:  # conv 5x5 pad 2 -> ReLU -> maxpool 2, as models._build_cnn lays it out
            ops += [{"op": "conv2d", "array": name, "padding": 2}, {"op": "relu"},
                    {"op": "maxpool2d", "kernel": 2}]
            if chain.weights[i + 1].dim() == 2:
                ops.append({"op": "flatten"})
        else:
            ops.append({"op": "linear", "array": name})
            if i < last:
                ops.append({"op": "relu"})
    return ops, arrays


class _Select(nn.Module):
    """Keep only the input features (or channels) the first layer reads."""

    index: Tensor

    def __init__(self, index: Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, self.index)


class _Zeros(nn.Module):
    """The whole network collapsed: every logit is 0 whatever the input."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.out)


def _frozen(arr: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32)), requires_grad=False)


def _assemble(ops: list[Op], arrays: dict[str, np.ndarray]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for op in ops:
        kind = op["op"]
        if kind == "flatten":
            layers.append(nn.Flatten())
        elif kind == "unflatten":
            layers.append(nn.Unflatten(1, tuple(op["shape"])))
        elif kind == "select":
            index = torch.from_numpy(np.asarray(arrays[op["array"]], dtype=np.int64))
            layers.append(_Select(index, int(op["dim"])))
        elif kind in ("linear", "conv2d"):
            w = arrays[op["array"]]
            # Built on the meta device: the weights are replaced, so the random init would be wasted.
            layer: nn.Linear | nn.Conv2d
            if kind == "linear":
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            else:
                layer = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), padding=int(op["padding"]),
                                  bias=False, device="meta")
            layer.weight = _frozen(w)
            layers.append(layer)
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "maxpool2d":
            layers.append(nn.MaxPool2d(int(op["kernel"])))
        elif kind == "zeros":
            layers.append(_Zeros(int(op["out"])))
        else:
            raise ValueError(f"unknown op {kind!r} in compact model description")
    return nn.Sequential(*layers).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """2 x MACs of the Linear/Conv2d layers for one sample, read off one forward pass."""
    total = 0

    def hook(layer: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features * (out.numel() // out.shape[-1])
        elif isinstance(layer, nn.Conv2d):
            total += 2 * layer.weight.numel() * out.shape[-2] * out.shape[-1]

    layers = [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def _finish(chain: _Chain, keep: list[Tensor]) -> CompactModel:
    ops, arrays = _plan(chain, keep)
    module = _assemble(ops, arrays)
    kept = {"input": (int(keep[0].sum()), chain.units_in)}
    kept |= {name: (int(k.sum()), k.numel()) for name, k in zip(chain.names, keep[1:], strict=True)}
    return CompactModel(module, count_params(module), count_flops(module, chain.input_shape),
                        kept, ops, arrays)


def compact_model(net: MaskedNet, *, gather_inputs: bool | None = None) -> CompactModel:
    """The smallest plain dense model with exactly net.eval()'s logits.

    gather_inputs: drop unread input features/channels and index_select the rest at run time.
    None decides by GATHER_MAX_FRACTION (the gather only pays off when enough are dropped).
    """
    chain = _chain(net)
    keep = _surviving(_connectivity(chain))
    if gather_inputs is None:
        gather_inputs = float(keep[0].float().mean()) <= GATHER_MAX_FRACTION
    if not gather_inputs and not _collapsed(keep):
        keep[0] = torch.ones_like(keep[0])  # read every input; the dropped columns stay as zeros
    return _finish(chain, keep)


def dense_reference(net: MaskedNet) -> nn.Module:
    """The same architecture at full size with W * M as plain dense weights: the speed baseline."""
    chain = _chain(net)
    keep = [torch.ones(chain.units_in, dtype=torch.bool)]
    keep += [torch.ones(w.shape[0], dtype=torch.bool) for w in chain.weights]
    return _assemble(*_plan(chain, keep))


# -- timing and report ----------------------------------------------------------------------
def measure_latency(module: nn.Module, example_batch: Tensor, repeats: int = 200, warmup: int = 20,
                    threads: int = 1) -> dict[str, float]:
    """Wall-clock per forward pass in ms: median (p50) and mean over `repeats` timed calls.

    One thread by default: the edge boards run one model per core, and it keeps numbers stable.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    module.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                module(example_batch)
            for _ in range(repeats):
                start = time.perf_counter()
                module(example_batch)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"p50_ms": statistics.median(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3}


def _batch(x: Tensor, n: int) -> Tensor:
    """The first n samples, tiling x when it has fewer."""
    reps = math.ceil(n / x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def export_report(net: MaskedNet, x_sample: np.ndarray, *, repeats: int = 200) -> dict[str, Any]:
    """Sizes, FLOPs, latencies (batch 1 and 64, 1 thread) of dense W*M vs compact, and exactness."""
    compact = compact_model(net)
    dense = dense_reference(net)
    x = torch.from_numpy(np.asarray(x_sample, dtype=np.float32))
    if x.shape[0] == 0:
        raise ValueError("x_sample needs at least one sample")
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            ref, got = net(x), compact.module(x)
    finally:
        net.train(was)
    dense_params = count_params(dense)
    dense_flops = count_flops(dense, _chain(net).input_shape)
    report: dict[str, Any] = {
        "dense_params": dense_params,
        "compact_params": compact.params,
        "param_ratio": compact.params / dense_params,
        "dense_flops": dense_flops,
        "compact_flops": compact.flops,
        "flops_ratio": compact.flops / dense_flops,
    }
    for b in (1, 64):
        xb = _batch(x, b)
        d = measure_latency(dense, xb, repeats)["p50_ms"]
        c = measure_latency(compact.module, xb, repeats)["p50_ms"]
        report |= {f"dense_latency_b{b}_ms": d, f"compact_latency_b{b}_ms": c, f"speedup_b{b}": d / c}
    report |= {
        "predictions_identical": bool(torch.equal(ref.argmax(dim=1), got.argmax(dim=1))),
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "kept_units": {k: list(v) for k, v in compact.kept_units.items()},
    }
    return report


# -- persistence ----------------------------------------------------------------------------
def save_compact(compact: CompactModel, path: str | Path) -> None:
    """One .npz file: each weight array plus a JSON description of the op sequence. No pickle."""
    if _META_KEY in compact.arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    meta = {"format": FORMAT, "ops": compact.ops,
            "kept_units": {k: list(v) for k, v in compact.kept_units.items()}}
    payload: dict[str, Any] = {_META_KEY: np.array(json.dumps(meta)), **compact.arrays}
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **payload)


def load_compact(path: str | Path) -> nn.Module:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z[_META_KEY]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
        arrays = {k: z[k] for k in z.files if k != _META_KEY}
    return _assemble(meta["ops"], arrays)
