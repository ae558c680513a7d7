"""FedDST: one test per trap of the reference code (bibikar/feddst) showing ours does not have it,
plus the server's rule (average over holders, union, magnitude re-prune to S) and ERK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.data import FederatedDataset, load_task
from shared.models import ModelSpec
from shared.payloads import dense_part, sparse_part
from shared.rounds import sample_devices
from shared.sim.strategy_run import run_strategy
from shared.strategies import StrategyConfig
from shared.strategies.base import tensors, train_loop
from shared.strategies.feddst import (
    FedDSTDevice,
    FedDSTServer,
    annealed_alpha,
    layer_densities,
    readjust_mask,
    readjust_params,
)
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy

CFG = StrategyConfig(local_epochs=1, sparsity=0.8, alpha=0.2, readjust_every=1)


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=16)


def _device(data: FederatedDataset, cfg: StrategyConfig) -> FedDSTDevice:
    d = data.devices[0]
    dev = FedDSTDevice(d.device_id, _spec(data), cfg, (d.train.x, d.train.y), seed=0)
    dev.prepare()
    return dev


def _task(server: FedDSTServer, device: str, round_id: int = 1, **params: object) -> StrategyMessage:
    task = server.task(round_id, device)
    if params:
        task = StrategyMessage(type="stask", strategy="feddst", device=device, round=round_id, model=task.model,
                               parts=task.parts, params={**task.params, **params})  # type: ignore[dict-item]
    return decode_strategy(encode_strategy(task), expect_type="stask")


def _flips(update: StrategyMessage) -> int:
    return sum(p.k or 0 for p in update.parts if p.name.endswith(".flip"))


# -- trap 1: readjustment silently never fired unless E == 10 --------------------------------
@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_readjustment_fires_with_any_local_epoch_count(digits: FederatedDataset, epochs: int) -> None:
    cfg = CFG.with_(local_epochs=epochs)
    server = FedDSTServer(_spec(digits), cfg, seed=0, rounds=10)
    assert [r for r in range(1, 11) if readjust_params(cfg.with_(readjust_every=3), r, 10)[0]] == [1, 4]
    update = _device(digits, cfg).train(_task(server, digits.devices[0].device_id))
    assert _flips(update) > 0  # the mask moved in the very first readjustment round


# -- trap 2: the annealed alpha was computed, then ignored -----------------------------------
def test_the_annealed_alpha_is_the_one_used(digits: FederatedDataset) -> None:
    assert annealed_alpha(0.2, 0, 10) == pytest.approx(0.2)
    assert annealed_alpha(0.2, 5, 10) == pytest.approx(0.1)  # alpha, not alpha squared
    assert annealed_alpha(0.2, 10, 10) == 0.0
    assert readjust_params(CFG, 6, 20) == (True, pytest.approx(annealed_alpha(0.2, 5, 10)))
    counts = {}
    for alpha in (0.2, 0.05):  # the task's alpha, whatever the configured one (0.2)
        server = FedDSTServer(_spec(digits), CFG, seed=0, rounds=10)
        update = _device(digits, CFG).train(_task(server, digits.devices[0].device_id, alpha=alpha))
        counts[alpha] = _flips(update)
        assert counts[alpha] == sum(2 * round(alpha * int(m.sum())) for m in server.m)  # out + in per layer
    assert 0 < counts[0.05] < counts[0.2]


# -- trap 3: growth picked among all entries and wrote zeros into active weights --------------
def test_growth_only_picks_inactive_entries_and_new_entries_start_at_zero(digits: FederatedDataset) -> None:
    w = np.array([0.9, 0.1, 0.5, 0.0, 0.0, 0.0], np.float32)
    mask = np.array([1, 1, 1, 0, 0, 0], bool)
    grad = np.array([9.0, 8.0, 7.0, 0.1, 0.3, 0.2], np.float32)  # active entries have the largest |g|
    new = readjust_mask(w, mask, grad, alpha=1 / 3)
    assert list(np.flatnonzero(new)) == [0, 2, 4]  # dropped the smallest |w| (1), grew the best inactive (4)

    server = FedDSTServer(_spec(digits), CFG, seed=0, rounds=10)
    dev = _device(digits, CFG)
    update = dev.train(_task(server, digits.devices[0].device_id))
    for (name, p), before, after in zip(tensors(dev.model), server.m, dev.masks, strict=True):
        grown = after & ~before
        assert grown.any() and not (after & ~before & before).any()
        values = p.detach().numpy().reshape(-1)
        assert np.all(values[grown] == 0.0)       # new entries start at 0
        assert np.all(values[~after] == 0.0)      # and nothing outside the mask survives
        assert np.count_nonzero(values[after & before]) == int((after & before).sum())  # kept ones keep values
        assert update.part(name).n == int(after.sum())


# -- trap 4: the models applied softmax before the cross-entropy -------------------------------
def test_no_softmax_before_the_cross_entropy(digits: FederatedDataset) -> None:
    dev = _device(digits, CFG)
    x = torch.from_numpy(dev.x[:16])
    logits = dev.model(x)
    assert not torch.allclose(logits.sum(1), torch.ones(16))  # raw logits, not probabilities
    expected = float(F.cross_entropy(logits.detach(), torch.from_numpy(dev.y[:16])))
    frozen = CFG.train.with_(weight_optimizer="sgd", weight_lr=0.0, batch_size=16)
    st = train_loop(dev.model, dev.x[:16], dev.y[:16], 1, frozen, seed=0)
    assert st.loss == pytest.approx(expected, rel=1e-5)


# -- trap 5: clients were sampled with replacement ---------------------------------------------
def test_clients_are_sampled_without_replacement(digits: FederatedDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(30):
        for r in range(1, 5):
            drawn = sample_devices([f"d{i}" for i in range(10)], 9, seed=seed, round_id=r)
            assert len(set(drawn)) == 9
    trained: list[tuple[int, str]] = []
    original = FedDSTDevice.train

    def spy(self: FedDSTDevice, task: StrategyMessage) -> StrategyMessage:
        trained.append((task.round, self.device_id))
        return original(self, task)

    monkeypatch.setattr(FedDSTDevice, "train", spy)
    run_strategy("feddst", CFG, digits, _spec(digits), rounds=3, sample_rate=0.8, seed=1)
    assert len(trained) == 3 * 6 - 3 and len(set(trained)) == len(trained)  # 5 of 6, each at most once


# -- the server's rule ---------------------------------------------------------------------
def test_server_averages_over_holders_takes_the_union_and_prunes_back_to_s(digits: FederatedDataset) -> None:
    server = FedDSTServer(_spec(digits), CFG.with_(density_rule="uniform"), seed=0, rounds=10)
    task = server.task(2, "a")  # round 2 of 10 with readjust_every 1: devices may send flips
    m = [mm.copy() for mm in server.m]
    n = m[0].size
    on, off = np.flatnonzero(m[0]), np.flatnonzero(~m[0])
    mask_b = m[0].copy()
    mask_b[on[:2]], mask_b[off[:2]] = False, True  # device b readjusted: 2 out, 2 in
    parts_a = [dense_part(name, np.full(int(mm.sum()), 1.0)) for name, mm in zip(server.names, m, strict=True)]
    grown_b = np.where(m[0], 4.0, 0.0)[mask_b]  # b's kept weights trained to 4, its grown ones start at 0
    parts_b = [dense_part(server.names[0], grown_b),
               sparse_part(f"{server.names[0]}.flip", n, np.concatenate([on[:2], off[:2]])), *parts_a[1:]]
    ups = {d: StrategyMessage(type="supdate", strategy="feddst", device=d, round=2, model=task.model,
                              parts=tuple(p), stats={"samples": s})
           for d, p, s in (("a", parts_a, 1), ("b", parts_b, 3))}
    server.fold(2, {d: decode_strategy(encode_strategy(u)) for d, u in ups.items()})
    w = server.w[0]
    assert int(server.m[0].sum()) == server.keep[0] == int(m[0].sum())  # back to the layer's density
    assert np.allclose(w[on[2:]], 0.25 * 1 + 0.75 * 4)  # sample-weighted over both holders
    assert np.allclose(w[on[:2]], 1.0) or not server.m[0][on[:2]].any()  # only a held them
    assert not server.m[0][off[:2]].any()  # b's zero-valued growth loses the magnitude re-prune


def test_erk_gives_small_layers_more_density_and_keeps_the_total() -> None:
    sizes = [(256, 784), (256, 256), (10, 256)]
    dens = layer_densities(sizes, 0.8, "erk")
    total = sum(d * o * i for d, (o, i) in zip(dens, sizes, strict=True)) / sum(o * i for o, i in sizes)
    assert total == pytest.approx(0.2) and dens[2] == 1.0 and dens[0] < dens[1] < 1.0
    assert layer_densities(sizes, 0.8, "uniform") == [pytest.approx(0.2)] * 3
    assert math.isclose(sum(layer_densities([(4, 4)], 0.5, "erk")), 0.5)


def test_the_run_reports_how_far_the_global_mask_moved(digits: FederatedDataset) -> None:
    r = run_strategy("feddst", CFG, digits, _spec(digits), rounds=3, sample_rate=0.5, seed=0)
    moves, readjusted = r.extra["mask_moves"], r.extra["readjust_rounds"]
    assert len(moves) == 3 and readjusted == [1, 2]  # T_end = 0.5 x 3 rounds: t = 0 and 1 readjust
    assert moves[2] == 0 and max(moves) > 0  # the mask only moves in readjustment rounds
