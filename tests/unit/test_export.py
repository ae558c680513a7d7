"""shared.export: the compact model predicts exactly like net.eval(), is as small as the fixed
point of dead-unit removal says, and survives a save/load round trip. No timing assertions."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from shared.export import (
    CompactModel,
    compact_model,
    count_params,
    dense_reference,
    export_report,
    load_compact,
    measure_latency,
    save_compact,
)
from shared.models import MaskedNet, ModelSpec, build_model

D_IN, WIDTH, CLASSES = 600, 64, 7
IMAGE = (1, 16, 16)  # flat = 32 channels x 4 x 4
HW = (IMAGE[1] // 4) * (IMAGE[2] // 4)


def mlp(seed: int = 0, **kw: object) -> MaskedNet:
    return build_model(ModelSpec("mlp", (D_IN,), CLASSES, width=WIDTH, seed=seed).with_(**kw))


def cnn(seed: int = 0, image: tuple[int, ...] = IMAGE) -> MaskedNet:
    return build_model(ModelSpec("cnn", image, CLASSES, width=32, seed=seed))


def all_on(net: MaskedNet) -> MaskedNet:
    """Every mask bit on, so only the structures decide which units die (exact expectations)."""
    net.set_scores(np.abs(net.scores_flat()) + 1e-3)
    return net


def tensors(net: MaskedNet) -> dict[str, Tensor]:
    """The structure buffers by layer name, to carve dead units into."""
    return {t.name: cast(Tensor, t.structure) for t in net.masked()}


def logits(module: nn.Module, x: Tensor) -> Tensor:
    module.eval()
    with torch.no_grad():
        out: Tensor = module(x)
    return out


def assert_same(net: MaskedNet, compact: CompactModel, seed: int = 0, n: int = 32) -> None:
    x = torch.randn(n, *net.spec.input_shape, generator=torch.Generator().manual_seed(seed))
    ref, got = logits(net, x), logits(compact.module, x)
    assert got.shape == ref.shape
    scale = float(ref.abs().max()) + 1e-6
    torch.testing.assert_close(got, ref, atol=1e-5 * scale, rtol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def weight_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


# -- MLP --------------------------------------------------------------------------------------
def test_fully_alive_mlp_keeps_dense_size() -> None:
    net = all_on(mlp())
    compact = compact_model(net)
    dense = dense_reference(net)
    assert compact.params == count_params(dense) == WIDTH * D_IN + WIDTH * WIDTH + CLASSES * WIDTH
    assert compact.flops == 2 * compact.params
    assert compact.kept_units == {"input": (D_IN, D_IN), "fc1": (WIDTH, WIDTH), "fc2": (WIDTH, WIDTH),
                                  "fc3": (CLASSES, CLASSES)}
    assert_same(net, compact)
    torch.testing.assert_close(logits(dense, torch.ones(2, D_IN)), logits(net, torch.ones(2, D_IN)))


def test_zeroed_fc1_rows_are_removed() -> None:
    net = all_on(mlp())
    dead = 24
    tensors(net)["fc1"][:dead] = False
    compact = compact_model(net)
    alive = WIDTH - dead
    assert compact.kept_units["fc1"] == (alive, WIDTH)
    assert compact.kept_units["fc2"] == (WIDTH, WIDTH)
    assert weight_shapes(compact.module) == [(alive, D_IN), (WIDTH, alive), (CLASSES, WIDTH)]
    assert count_params(dense_reference(net)) - compact.params == dead * (D_IN + WIDTH)
    assert_same(net, compact)


def test_removal_iterates_to_a_fixed_point() -> None:
    net = all_on(mlp())
    s = tensors(net)
    # Forward chain: fc1 unit 3 has no inputs -> fc2 unit 9, fed only by fc1 unit 3, dies next.
    s["fc1"][3] = False
    s["fc2"][9] = False
    s["fc2"][9, 3] = True
    # Backward chain: fc2 unit 5 is never read -> fc1 unit 0, read only by fc2 unit 5, dies next.
    s["fc3"][:, 5] = False
    s["fc2"][:, 0] = False
    s["fc2"][5, 0] = True
    compact = compact_model(net)
    assert compact.kept_units["fc1"] == (WIDTH - 2, WIDTH)
    assert compact.kept_units["fc2"] == (WIDTH - 2, WIDTH)
    assert_same(net, compact)


def test_kept_units_are_all_live_in_the_compact_model() -> None:
    """Random row/column structure plus random 50% masks: exact, and nothing dead is left over."""
    for seed in range(4):
        net = mlp(seed)
        rng = np.random.default_rng(seed)
        for s in tensors(net).values():
            s[torch.from_numpy(rng.random(s.shape[0]) < 0.3)] = False
            s[:, torch.from_numpy(rng.random(s.shape[1]) < 0.3)] = False
        compact = compact_model(net, gather_inputs=True)
        assert compact.params < count_params(dense_reference(net))
        assert_same(net, compact, seed)
        ws = [m.weight for m in compact.module.modules() if isinstance(m, nn.Linear)]
        for w_in, w_out in itertools.pairwise(ws):
            assert bool((w_in != 0).any(1).all())  # every kept hidden unit is fed...
            assert bool((w_out != 0).any(0).all())  # ...and read
        assert bool((ws[0] != 0).any(0).all())  # and every gathered input is read


def test_unread_inputs_are_gathered_when_it_pays() -> None:
    net = all_on(mlp())
    tensors(net)["fc1"][:, :400] = False  # a third of the inputs stays: gather by default
    compact = compact_model(net)
    assert compact.kept_units["input"] == (200, D_IN)
    assert weight_shapes(compact.module)[0] == (WIDTH, 200)
    assert_same(net, compact)
    ungathered = compact_model(net, gather_inputs=False)
    assert ungathered.kept_units["input"] == (D_IN, D_IN)
    assert ungathered.params - compact.params == WIDTH * 400
    assert_same(net, ungathered)


def test_few_unread_inputs_are_not_gathered_by_default() -> None:
    net = all_on(mlp())
    tensors(net)["fc1"][:, :60] = False  # 90% still read: the index_select would cost more
    compact = compact_model(net)
    assert compact.kept_units["input"] == (D_IN, D_IN)
    assert_same(net, compact)


def test_collapsed_network_outputs_zero_logits() -> None:
    net = mlp()
    tensors(net)["fc2"][:] = False
    compact = compact_model(net)
    assert compact.params == 0 and compact.flops == 0
    assert compact.kept_units["fc1"] == (0, WIDTH) and compact.kept_units["fc3"] == (CLASSES, CLASSES)
    assert_same(net, compact)


def test_dense_baseline_spec_is_exported_at_full_size() -> None:
    net = mlp(dense=True)
    compact = compact_model(net)
    assert compact.params == count_params(dense_reference(net))
    assert_same(net, compact)


# -- CNN --------------------------------------------------------------------------------------
def test_fully_alive_cnn_keeps_dense_size() -> None:
    net = all_on(cnn())
    compact = compact_model(net)
    assert compact.params == count_params(dense_reference(net))
    assert weight_shapes(compact.module) == [(16, 1, 5, 5), (32, 16, 5, 5), (32, 32 * HW), (CLASSES, 32)]
    assert_same(net, compact)


def test_dead_filters_and_channels_are_removed() -> None:
    net = all_on(cnn())
    s = tensors(net)
    s["conv1"][:4] = False  # conv1 filters 0-3 output 0
    s["conv2"][:, 4:6] = False  # conv1 filters 4-5 are never read by conv2
    s["conv2"][:3] = False  # conv2 filters 0-2 output 0
    s["fc1"][:, 3 * HW:5 * HW] = False  # conv2 channels 3-4 are never read by fc1
    s["fc1"][:2] = False  # fc1 units 0-1 output 0
    compact = compact_model(net)
    assert compact.kept_units == {"input": (1, 1), "conv1": (10, 16), "conv2": (27, 32), "fc1": (30, 32),
                                  "fc2": (CLASSES, CLASSES)}
    assert weight_shapes(compact.module) == [(10, 1, 5, 5), (27, 10, 5, 5), (30, 27 * HW), (CLASSES, 30)]
    assert_same(net, compact)


def test_cnn_random_structure_matches() -> None:
    for seed in range(3):
        net = cnn(seed, image=(3, 12, 12))
        rng = np.random.default_rng(seed)
        for s in tensors(net).values():
            s[torch.from_numpy(rng.random(s.shape[0]) < 0.3)] = False
            s[:, torch.from_numpy(rng.random(s.shape[1]) < 0.2)] = False
        compact = compact_model(net, gather_inputs=True)
        assert compact.params <= count_params(dense_reference(net))
        assert_same(net, compact, seed)


def test_cnn_unread_input_channel_is_gathered() -> None:
    net = all_on(cnn(image=(3, 12, 12)))
    tensors(net)["conv1"][:, 1] = False
    compact = compact_model(net, gather_inputs=True)
    assert compact.kept_units["input"] == (2, 3)
    assert weight_shapes(compact.module)[0] == (16, 2, 5, 5)
    assert_same(net, compact)


# -- persistence, unsupported archs, timing, report -------------------------------------------
@pytest.mark.parametrize("build", [mlp, cnn])
def test_save_load_round_trip(tmp_path: Path, build: Callable[[], MaskedNet]) -> None:
    net = build()
    s = tensors(net)
    first = next(iter(s))
    s[first][: s[first].shape[0] // 2] = False
    if net.spec.arch == "mlp":
        s[first][:, :400] = False  # exercise the input gather as well
    compact = compact_model(net)
    path = tmp_path / "device-07.compact"  # no .npz suffix: the file must land at this exact path
    save_compact(compact, path)
    assert path.exists()
    loaded = load_compact(path)
    x = torch.randn(16, *net.spec.input_shape)
    assert torch.equal(logits(loaded, x), logits(compact.module, x))
    assert count_params(loaded) == compact.params
    with np.load(path, allow_pickle=False) as z:  # readable without pickle
        assert "__meta__" in z.files


def test_load_rejects_foreign_npz(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, __meta__=np.array('{"format": "something-else"}'))
    with pytest.raises(ValueError, match="fedmask-compact"):
        load_compact(path)


def test_char_lstm_is_not_supported() -> None:
    net = build_model(ModelSpec("char_lstm", (20,), 30, width=16))
    with pytest.raises(NotImplementedError, match="char_lstm"):
        compact_model(net)
    with pytest.raises(NotImplementedError, match="char_lstm"):
        dense_reference(net)


def test_measure_latency_reports_positive_times() -> None:
    threads = torch.get_num_threads()
    out = measure_latency(nn.Linear(8, 4), torch.randn(2, 8), repeats=5, warmup=1)
    assert set(out) == {"p50_ms", "mean_ms"} and all(v > 0 for v in out.values())
    assert torch.get_num_threads() == threads


def test_export_report() -> None:
    net = mlp()
    tensors(net)["fc1"][:40] = False
    net.train()
    x = np.random.default_rng(0).standard_normal((10, D_IN)).astype(np.float32)
    report = export_report(net, x, repeats=3)
    assert net.training  # the report must not leave the net in eval mode
    assert report["predictions_identical"] is True
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["compact_params"] < report["dense_params"]
    assert 0 < report["param_ratio"] < 1 and 0 < report["flops_ratio"] < 1
    assert report["kept_units"]["fc1"][1] == WIDTH and report["kept_units"]["fc1"][0] <= WIDTH - 40
    for key in ("dense_latency_b1_ms", "compact_latency_b1_ms", "dense_latency_b64_ms",
                "compact_latency_b64_ms", "speedup_b1", "speedup_b64"):
        assert report[key] > 0
