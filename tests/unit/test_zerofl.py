"""ZeroFL on SWAT: top-K weights forward, top-K activations for dW, all weights updated, thresholds
refreshed every 10 batches, first layer dense and last sparse, the top (1 - sp + mr) upload, the
server's three unsent-entry rules, and FLOPs counted from the sparse operands."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.data import FederatedDataset, load_task
from shared.layers import MaskedTensor
from shared.models import ModelSpec
from shared.strategies import StrategyConfig
from shared.strategies.swat import SwatLinear, kth_largest
from shared.strategies.zerofl import ZeroFLDevice, ZeroFLServer, merge_sparse, upload_count
from shared.strategy_codec import decode_strategy, encode_strategy


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=0)


def _layer(w: np.ndarray, sparsity: float, first: bool = False, period: int = 10) -> SwatLinear:
    t = MaskedTensor("fc", w, np.zeros_like(w), 0, "fc", dense=True)
    layer = SwatLinear(t, sparsity, period, first)
    layer.train()
    return layer


def test_forward_uses_the_top_k_weights_and_dw_the_top_k_activations() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 10)).astype(np.float32)
    layer = _layer(w, 0.5)
    x = torch.from_numpy(rng.normal(size=(3, 10)).astype(np.float32))
    y = layer(x)
    wt = torch.from_numpy(w)
    ws = wt * (wt.abs() >= kth_largest(wt, 20))
    xs = x * (x.abs() >= kth_largest(x, 15))
    assert int((ws != 0).sum()) == 20 and int((xs != 0).sum()) == 15
    assert torch.allclose(y, x @ ws.t())
    dy = torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32))
    y.backward(dy)
    grad = layer.masked.weight.grad
    assert grad is not None
    assert torch.allclose(grad, dy.t() @ xs)       # dW from the sparse activations
    assert bool((grad[ws == 0] != 0).any())          # a dense gradient: weights outside the top-K train too


def test_thresholds_are_refreshed_every_ten_batches() -> None:
    w = np.linspace(-1, 1, 40, dtype=np.float32).reshape(4, 10)
    layer = _layer(w, 0.9)
    x = torch.ones(2, 10)
    seen = []
    for step in range(21):
        with torch.no_grad():
            layer.masked.weight.mul_(1.1)  # |W| grows every batch: a fresh threshold would move each time
        layer(x)
        seen.append(layer.t_w)
        assert layer.batches == step + 1
    assert len(set(seen[:10])) == 1 and len(set(seen[10:20])) == 1 and seen[10] > seen[0] and seen[20] > seen[10]


def test_first_layer_dense_last_sparse_and_flops_counted(digits: FederatedDataset) -> None:
    d = digits.devices[0]
    spec = ModelSpec("mlp", digits.input_shape, digits.num_classes, width=16)
    dev = ZeroFLDevice(d.device_id, spec, StrategyConfig(sparsity=0.9, local_epochs=1), (d.train.x, d.train.y), 0)
    dev.prepare()
    assert [layer.sparsity for layer in dev.swat] == [0.0, 0.9, 0.9]
    server = ZeroFLServer(spec, dev.cfg, seed=0, rounds=1)
    update = dev.train(decode_strategy(encode_strategy(server.task(1, d.device_id))))
    flops, dense = update.stats["flops"], update.stats["dense_flops"]
    sizes = [layer.masked.weight.numel() for layer in dev.swat]
    assert dense == pytest.approx(len(d.train.y) * 2 * (3 * sum(sizes) - sizes[0]))
    assert flops < dense
    dense_first = len(d.train.y) * 2 * 2 * sizes[0]  # the dense first layer: forward and dW, no dX
    assert flops > dense_first
    # the upload: the top ceil((1 - sp + mr) d) weights of every tensor, as values with positions
    for (name, _), layer in zip([(t.name, t) for t in dev.model.masked()], dev.swat, strict=True):
        part = update.part(name)
        w = layer.masked.weight.detach().numpy().reshape(-1)
        k = upload_count(w.size, 0.9, 0.2)
        assert part.k == k == math.ceil(0.3 * w.size)
        assert np.min(np.abs(w[part.positions()])) >= np.sort(np.abs(w))[-k]
        assert np.array_equal(part.array(), w[part.positions()])


def test_sparsify_first_makes_the_first_layer_sparse_too(digits: FederatedDataset) -> None:
    d = digits.devices[0]
    spec = ModelSpec("mlp", digits.input_shape, digits.num_classes, width=16)
    dev = ZeroFLDevice(d.device_id, spec, StrategyConfig(sparsity=0.9, sparsify_first=True), (d.train.x, d.train.y), 0)
    dev.prepare()
    assert [layer.sparsity for layer in dev.swat] == [0.9, 0.9, 0.9]


def test_the_three_unsent_entry_rules() -> None:
    prev = np.array([10.0, 10.0, 10.0, 10.0], np.float32)
    sent = [(np.array([0, 1]), np.array([2.0, 4.0]), 1.0),   # device a: 1 sample, entries 0, 1
            (np.array([1, 2]), np.array([8.0, 6.0]), 3.0)]   # device b: 3 samples, entries 1, 2
    zero = merge_sparse(prev, sent, "zero")
    holders = merge_sparse(prev, sent, "holders")
    keep = merge_sparse(prev, sent, "keep")
    assert np.allclose(zero, [2 / 4, (4 + 24) / 4, 18 / 4, 0.0])           # unsent counts as 0
    assert np.allclose(holders, [2.0, 7.0, 6.0, 10.0])                      # over senders; nobody: previous
    assert np.allclose(keep, [(2 + 30) / 4, 7.0, (10 + 18) / 4, 10.0])      # unsent: the previous value
    with pytest.raises(ValueError, match="unsent"):
        merge_sparse(prev, sent, "mean")


def test_zerofl_at_sparsity_0_with_full_upload_is_fedavg(digits: FederatedDataset) -> None:
    from shared.sim.strategy_run import run_strategy

    spec = ModelSpec("mlp", digits.input_shape, digits.num_classes, width=16)
    cfg = StrategyConfig(local_epochs=1, sparsity=0.0, mask_ratio=1.0)
    z = run_strategy("zerofl", cfg, digits, spec, rounds=2, sample_rate=0.5, seed=0)
    f = run_strategy("fedavg", cfg, digits, spec, rounds=2, sample_rate=0.5, seed=0)
    assert z.per_device_accuracy == f.per_device_accuracy  # SWAT at sp 0 is dense training, the upload is whole
    assert z.extra["flops_ratio"] == 1.0 and z.extra["dense_eval_accuracy"] == z.personalized_accuracy


def test_eval_with_top_k_weights_differs_from_dense_eval() -> None:
    rng = np.random.default_rng(1)
    layer = _layer(rng.normal(size=(4, 10)).astype(np.float32), 0.9)
    layer.eval()
    x = torch.from_numpy(rng.normal(size=(2, 10)).astype(np.float32))
    dense = layer(x)
    layer.eval_topk = True
    assert not torch.allclose(dense, layer(x))
