"""Frozen weights, masked layers, models and pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.frozen import frozen_weight
from shared.layers import _SigmoidSTE
from shared.models import ModelSpec, build_model
from shared.pruning import one_shot_prune
from shared.train import TrainConfig, evaluate, local_train

SPEC = ModelSpec("mlp", (20,), 3, width=16, seed=7)


def test_frozen_weights_depend_only_on_seed_and_name() -> None:
    a = frozen_weight(7, "fc1", (4, 5), 5)
    assert np.array_equal(a, frozen_weight(7, "fc1", (4, 5), 5))
    assert not np.array_equal(a, frozen_weight(8, "fc1", (4, 5), 5))
    assert not np.array_equal(a, frozen_weight(7, "fc2", (4, 5), 5))
    assert set(np.unique(a)) == {np.float32(-np.sqrt(2 / 5)), np.float32(np.sqrt(2 / 5))}


def test_fingerprint_is_pinned() -> None:
    """PCG64 integer streams are platform-independent, so this hex must hold on x86-64 and aarch64 alike.
    If it changes, every deployed board would disagree with the server: change it only on purpose."""
    assert build_model(SPEC).fingerprint() == "316609fc44e10c9faa2e92bb92c57466"


def test_two_builds_are_identical() -> None:
    a, b = build_model(SPEC), build_model(SPEC)
    assert a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.scores_flat(), b.scores_flat())
    assert a.layout_hash() == b.layout_hash()


def test_ste_gradient_is_sigmoid_derivative() -> None:
    s = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    m = _SigmoidSTE.apply(s, 1.0)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    m.sum().backward()
    sig = torch.sigmoid(s.detach())
    assert torch.allclose(s.grad, sig * (1 - sig))


@pytest.mark.parametrize("arch,shape,classes", [("mlp", (6, 10), 4), ("cnn", (64,), 3), ("char_lstm", (12,), 9)])
def test_forward_and_flat_views(arch: str, shape: tuple[int, ...], classes: int) -> None:
    net = build_model(ModelSpec(arch, shape, classes, width=8))
    x = torch.randint(0, classes, (5, *shape)) if arch == "char_lstm" else torch.randn(5, *shape)
    assert net(x).shape == (5, classes)
    assert net.mask_bits().shape == (net.nbits,)
    bits = np.random.default_rng(0).random(net.nbits) < 0.3
    net.apply_mask_bits(bits)
    assert np.array_equal(net.mask_bits(), bits)


def test_eval_uses_hard_mask_and_structure() -> None:
    net = build_model(SPEC)
    structure = np.ones(net.nbits, dtype=bool)
    structure[: net.nbits // 2] = False
    net.set_structure(structure)
    assert not (net.mask_bits() & ~structure).any()
    w = net.masked()[0]
    net.eval()
    eff = w.effective_weight()
    assert torch.equal(eff, w.weight * ((w.scores >= 0) & w.structure))


def _toy(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 20)).astype(np.float32)
    x[np.arange(n), y] += 3.0  # linearly separable-ish: class k lights up feature k
    return x, y.astype(np.int64)


def test_mask_training_learns() -> None:
    x, y = _toy()
    net = build_model(SPEC.with_(width=64))
    before = evaluate(net, x, y)[1]
    local_train(net, x, y, 15, TrainConfig(mask_mode="ste", optimizer="sgd", lr=1.0), seed=0)
    after = evaluate(net, x, y)[1]
    assert after > 0.9 and after > before + 0.2
    # only scores moved: the frozen weights are untouched
    assert net.fingerprint() == build_model(SPEC.with_(width=64)).fingerprint()


def test_one_shot_pruning_keeps_rho_in_last_layers_only() -> None:
    x, y = _toy()
    net = build_model(SPEC.with_(width=32))
    structure, _ = one_shot_prune(net, x, y, TrainConfig(), last_k=2, rho=0.2, seed=0)
    region = net.region_of_last_layers(2)
    assert structure[~region].all()
    for t in net.masked():
        if t.layer_index >= net.num_layers - 2:
            assert abs(t.structure.float().mean().item() - 0.2) < 0.01
    assert not (net.mask_bits() & ~structure).any()


def test_group_lasso_pushes_masks_sparse() -> None:
    x, y = _toy()
    dens = []
    for lam in (0.0, 5.0):
        net = build_model(SPEC.with_(width=32))
        local_train(net, x, y, 10, TrainConfig(mask_mode="ste", optimizer="sgd", lr=1.0, lam=lam), seed=0)
        dens.append(net.mask_bits().mean())
    assert dens[1] < dens[0] - 0.05


def test_group_lasso_gradient_is_finite_when_structure_empties_a_group() -> None:
    net = build_model(SPEC)
    structure = np.ones(net.nbits, dtype=bool)
    first = net.masked()[0]
    structure[: first.shape[1]] = False  # the whole first row of fc1 pruned away
    net.set_structure(structure)
    net.group_lasso().backward()
    assert all(torch.isfinite(t.scores.grad).all() for t in net.masked())
