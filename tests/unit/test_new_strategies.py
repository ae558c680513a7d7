"""Per-FedAvg and BNN-FedAvg (issue 12 item 4/5): wire sizes, personalisation, determinism, hostile input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shared.data import FederatedDataset, load_task
from shared.errors import CodecError
from shared.models import ModelSpec
from shared.payloads import bits_part, dense_part
from shared.sim.strategy_run import run_strategy
from shared.strategies import StrategyConfig, get_strategy
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=32)


def _update(data: FederatedDataset, name: str, cfg: StrategyConfig) -> tuple[object, StrategyMessage]:
    strategy, d = get_strategy(name), data.devices[0]
    server = strategy.server(_spec(data), cfg, seed=0, rounds=1)
    dev = strategy.device(d.device_id, _spec(data), cfg, (d.train.x, d.train.y), 0)
    dev.prepare()
    task = decode_strategy(encode_strategy(server.task(1, d.device_id)), expect_type="stask")
    return server, decode_strategy(encode_strategy(dev.train(task)), expect_type="supdate")


def test_bnn_uplink_and_downlink_are_about_one_bit_per_parameter(digits: FederatedDataset) -> None:
    spec = _spec(digits).with_(width=256)  # enough weights that the envelope is small next to them
    r = run_strategy("bnn-fedavg", StrategyConfig(local_epochs=1), digits, spec, rounds=2,
                     sample_rate=0.5, seed=0)
    assert 1.0 <= r.uplink_bits_per_param < 1.3  # packed signs + one scale per tensor + the envelope
    assert 1.0 <= r.extra["downlink_bits_per_param"] < 1.3
    dense = run_strategy("fedavg", StrategyConfig(local_epochs=1), digits, spec, rounds=2,
                         sample_rate=0.5, seed=0)
    assert dense.uplink_bits_per_param > 25 * r.uplink_bits_per_param


def test_bnn_device_model_is_binary_and_server_takes_the_majority(digits: FederatedDataset) -> None:
    server, up = _update(digits, "bnn-fedavg", StrategyConfig(local_epochs=1))
    for p in up.parts:
        assert p.enc == ("dense" if p.name.endswith(":scale") else "bits")
        assert p.nbytes() == (4 if p.name.endswith(":scale") else -(-p.n // 8))
    name = server.names[0]  # type: ignore[attr-defined]
    n = server.signs[0].size  # type: ignore[attr-defined]
    votes = [np.arange(n) % 3 == 0, np.arange(n) % 3 != 2, np.arange(n) % 3 == 0]  # True = +1
    msgs = {}
    for i, v in enumerate(votes):
        parts = [bits_part(name, v) if p.name == name else p for p in up.parts]
        msgs[f"d{i}"] = replace(up, device=f"d{i}", parts=tuple(parts))
    server.fold(1, msgs)  # type: ignore[attr-defined]
    expect = np.where(np.sum(votes, axis=0) >= 2, 1.0, -1.0)
    assert np.array_equal(server.signs[0], expect)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["per-fedavg", "bnn-fedavg"])
def test_a_run_is_deterministic_under_its_seed(digits: FederatedDataset, name: str) -> None:
    cfg = StrategyConfig(local_epochs=1)
    a, b, c = (run_strategy(name, cfg, digits, _spec(digits), rounds=2, sample_rate=0.5, seed=s) for s in (4, 4, 5))
    assert (a.per_device_accuracy, a.uplink_bytes) == (b.per_device_accuracy, b.uplink_bytes)
    # another seed samples other devices (BNN's signs may not flip in 2 rounds, so accuracy can tie)
    assert (a.per_device_accuracy, a.extra["train_flops"]) != (c.per_device_accuracy, c.extra["train_flops"])


def test_per_fedavg_adaptation_changes_and_helps_on_the_device_data(digits: FederatedDataset) -> None:
    """One alpha-step on the device's own data must change the evaluated model, and, with label-skewed
    devices, raise accuracy on the device's training data over the unadapted global model."""
    cfg = StrategyConfig(local_epochs=2, inner_lr=0.1, outer_lr=0.05)
    strategy, spec = get_strategy("per-fedavg"), _spec(digits)
    server = strategy.server(spec, cfg, seed=0, rounds=3)
    devs = {}
    for d in digits.devices:
        devs[d.device_id] = dev = strategy.device(d.device_id, spec, cfg, (d.train.x, d.train.y), 0)
        dev.prepare()
    for r in (1, 2, 3):
        ups = {k: decode_strategy(encode_strategy(dev.train(server.task(r, k)))) for k, dev in devs.items()}
        server.fold(r, ups)
    gains = []
    for d in digits.devices:
        dev = devs[d.device_id]
        dev.apply(server.model_message(d.device_id))
        before = dev.evaluate_unadapted(d.train.x, d.train.y)  # type: ignore[attr-defined]
        after = dev.evaluate(d.train.x, d.train.y)[1]
        assert dev.evaluate(d.train.x, d.train.y)[1] == after  # weights restored after adapting
        assert dev.evaluate_unadapted(d.train.x, d.train.y) == before  # type: ignore[attr-defined]
        gains.append(after - before)
    assert any(g != 0 for g in gains) and float(np.mean(gains)) > 0


@pytest.mark.parametrize("name", ["per-fedavg", "bnn-fedavg"])
def test_malformed_updates_are_refused_with_a_reason(digits: FederatedDataset, name: str) -> None:
    server, up = _update(digits, name, StrategyConfig(local_epochs=1))
    first = up.parts[0]
    if name == "per-fedavg":
        bad = [dense_part(first.name, np.zeros(first.n - 1)),            # wrong size
               bits_part(first.name, np.zeros(first.n, bool))]           # wrong encoding
        with pytest.raises(CodecError, match="non-finite"):             # NaN never reaches the server
            dense_part(first.name, np.full(first.n, np.nan))
    else:
        scale = first.name + ":scale"
        bad = [bits_part(first.name, np.zeros(first.n - 1, bool)),
               dense_part(first.name, np.zeros(first.n)),
               dense_part(scale, [-1.0]), dense_part(scale, [1e9]), dense_part(scale, [0.0]),
               dense_part(scale, [1.0, 2.0])]
    for part in bad:
        parts = tuple(part if p.name == part.name else p for p in up.parts)
        with pytest.raises(CodecError, match=r"expected|outside"):
            server.fold(1, {"a": replace(up, parts=parts)})  # type: ignore[attr-defined]
    missing = replace(up, parts=up.parts[1:])
    with pytest.raises(CodecError):
        server.fold(1, {"a": missing})  # type: ignore[attr-defined]
