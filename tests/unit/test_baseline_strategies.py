"""The dense baselines as strategies (issue 12): standalone and topk through the interface equal
shared/sim/baselines.py device for device (the models evaluated, not only their accuracies), FedAvg's
and Top-k's halves carry every trained tensor (a char LSTM's real-valued gates too), Top-k's bytes are
its encoded sparse parts, malformed updates are refused with a reason, and standalone, which sends
nothing, has no pipeline and says why."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ops.cli import main
from shared.data import DeviceData, FederatedDataset, Split, load_task
from shared.errors import CodecError
from shared.models import MaskedNet, ModelSpec
from shared.payloads import Part, dense_part, sparse_part
from shared.presets import preset
from shared.sim.baselines import run_baseline
from shared.sim.strategy_run import run_strategy
from shared.sim.variants import default_config, run_variant
from shared.strategies import StrategyConfig, get_strategy
from shared.strategies.standalone import standalone_epochs
from shared.strategies.topk import sparsify, topk_count
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import strategy_setup
from shared.train import TrainConfig

ROUNDS, RATE, EPOCHS, SEED = 3, 0.5, 2, 3


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=16)


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A digest of every model either path evaluates (the baseline's and the strategy halves'), so a
    test compares the weights themselves: accuracies alone would not see a rounding-level difference."""
    seen: list[str] = []

    def spy(original: Callable[..., tuple[float, float]]) -> Callable[..., tuple[float, float]]:
        def evaluate(model: MaskedNet, *args: Any, **kwargs: Any) -> tuple[float, float]:
            h = hashlib.sha256()
            for p in model.parameters():
                h.update(p.detach().numpy().tobytes())
            seen.append(h.hexdigest())
            return original(model, *args, **kwargs)
        return evaluate

    import shared.sim.baselines as baselines
    import shared.strategies.base as base

    monkeypatch.setattr(baselines, "evaluate", spy(baselines.evaluate))
    monkeypatch.setattr(base, "evaluate", spy(base.evaluate))
    yield seen


def _both(method: str, data: FederatedDataset, spec: ModelSpec, evaluated: list[str], train: TrainConfig,
          **knobs: Any) -> tuple[Any, Any, set[str], set[str]]:
    base = run_baseline(method, data, spec, train, rounds=ROUNDS, sample_rate=RATE, local_epochs=EPOCHS, seed=SEED,
                        **knobs)
    base_models = set(evaluated)
    evaluated.clear()
    if method == "standalone":
        cfg = StrategyConfig(train=train, local_epochs=EPOCHS, standalone_epochs=standalone_epochs(
            EPOCHS, ROUNDS, RATE, knobs.get("final_local_epochs", 0)))
    else:
        cfg = StrategyConfig(train=train, local_epochs=EPOCHS, topk_fraction=knobs.get("topk_fraction", 0.1),
                             final_local_epochs=knobs.get("final_local_epochs", 0))
    mine = run_strategy(method, cfg, data, spec, rounds=ROUNDS, sample_rate=RATE, seed=SEED)
    return base, mine, base_models, set(evaluated)


# -- equal to the baseline -------------------------------------------------------------------
@pytest.mark.parametrize(("method", "knobs"), [("topk", {"topk_fraction": 0.1}), ("topk", {"topk_fraction": 0.5}),
                                               ("standalone", {"final_local_epochs": 0}),
                                               ("standalone", {"final_local_epochs": 1})])
def test_through_the_interface_is_the_baseline_bit_for_bit(digits: FederatedDataset, evaluated: list[str],
                                                           method: str, knobs: dict[str, Any]) -> None:
    base, mine, base_models, my_models = _both(method, digits, _spec(digits), evaluated,
                                               preset("digits").dense_train.with_(weight_lr=0.01), **knobs)
    assert mine.per_device_accuracy == base.per_device_accuracy
    assert mine.validation_accuracy == base.validation_accuracy
    assert my_models == base_models  # the same weights: one global model (topk), one per device (standalone)
    assert len(base_models) == (1 if method == "topk" else len(digits.devices))
    if method == "standalone":  # nothing travels, each way
        assert (mine.uplink_bytes, mine.downlink_bytes, mine.extra["updates"]) == (0, 0, 0)
        assert mine.uplink_bits_per_param == base.uplink_bits_per_param == 0.0
    else:
        assert mine.extra["downloads"] == mine.extra["updates"] == ROUNDS * 3  # every task carries the new model


def _lstm_fleet() -> FederatedDataset:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        x = rng.integers(0, 12, (n, 6)).astype(np.int64)
        return Split(x, (x.sum(1) % 12).astype(np.int64))
    return FederatedDataset("synthetic", [DeviceData(f"d{i}", split(40), split(10), split(20)) for i in range(4)],
                            12, (6,), 12)


@pytest.mark.parametrize("method", ["fedavg", "fedavg-ft", "topk"])
def test_a_char_lstm_averages_its_real_gates_too(evaluated: list[str], method: str) -> None:
    """The LSTM's real-valued gate weights and biases are trained: the baseline averages them, so the
    strategies send them (until 2026-12-04 FedAvg's halves sent the masked tensors only, and the global
    model kept its initial gates)."""
    data = _lstm_fleet()
    spec = ModelSpec("char_lstm", (6,), 12, width=8, embed_dim=4)
    train = TrainConfig(weight_optimizer="sgd", weight_lr=0.5, batch_size=8)
    base, mine, base_models, my_models = _both(method, data, spec, evaluated, train,
                                               **({"topk_fraction": 0.3} if method == "topk" else {}))
    assert my_models == base_models and mine.per_device_accuracy == base.per_device_accuracy
    assert "body.layers.0.real_ih" in {p.name for p in get_strategy(method).server(
        spec, StrategyConfig(), seed=0, rounds=1).task(1, "d0").parts}


@pytest.mark.parametrize("variant", ["topk", "standalone"])
def test_run_variant_via_the_strategy_equals_its_own_path(digits: FederatedDataset, variant: str) -> None:
    cfg = default_config(variant, preset("digits")).with_(local_epochs=EPOCHS, final_local_epochs=1)
    own, via = (run_variant(cfg, digits, _spec(digits), rounds=ROUNDS, sample_rate=RATE, seed=SEED, via_strategy=v)
                for v in (False, True))
    assert via.per_device_accuracy == own.per_device_accuracy and via.method == variant
    assert via.extra["downloads"] == own.extra["downloads"] and via.extra["via"] == "strategy"
    if variant == "standalone":
        assert via.extra["local_epochs_total"] == own.extra["local_epochs_total"] == 1 + 3 + 1


@pytest.mark.parametrize("variant", ["topk", "standalone"])
def test_simulate_runs_it_via_the_strategy(variant: str) -> None:
    res = CliRunner().invoke(main, ["simulate", "--task", "digits", "--variant", variant, "--via-strategy",
                                    "--rounds", "1", "--devices", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"{variant} on digits: personalized accuracy" in res.output


# -- Top-k's wire ----------------------------------------------------------------------------
def test_sparsify_keeps_the_largest_and_feeds_back_the_rest_exactly() -> None:
    rng = np.random.default_rng(1)
    delta, residual = rng.normal(size=500), rng.normal(scale=0.1, size=500)
    keep, sent, rest = sparsify(delta, residual, 50)
    full = delta + residual
    assert list(keep) == sorted(np.argsort(-np.abs(full))[:50]) and sent.dtype == np.float32
    back = rest.copy()
    back[keep] += sent
    assert np.array_equal(back, full)  # nothing lost: what was not sent, and the float32 rounding, stays
    assert np.count_nonzero(rest[keep]) > 0  # the rounding is there to feed back
    _, half, rest16 = sparsify(delta, residual, 50, "f16")
    assert np.array_equal(half, half.astype(np.float16).astype(np.float32)) and not np.array_equal(rest16, rest)
    assert (topk_count(0.0, 10), topk_count(0.1, 1000), topk_count(2.0, 10)) == (1, 100, 10)


def _exchange(data: FederatedDataset, cfg: StrategyConfig) -> tuple[Any, StrategyMessage, int]:
    server = get_strategy("topk").server(_spec(data), cfg, seed=0, rounds=1)
    d = data.devices[0]
    dev = get_strategy("topk").device(d.device_id, _spec(data), cfg, (d.train.x, d.train.y), 0)
    dev.prepare()
    body = encode_strategy(dev.train(decode_strategy(encode_strategy(server.task(1, d.device_id)))))
    return server, decode_strategy(body, expect_type="supdate"), len(body)


@pytest.mark.parametrize("fraction", [0.02, 0.3])
def test_an_update_is_k_entries_with_the_smaller_position_encoding(digits: FederatedDataset, fraction: float) -> None:
    server, up, size = _exchange(digits, StrategyConfig(local_epochs=1, topk_fraction=fraction))
    k = topk_count(fraction, int(server.w.size))
    assert sum(p.k or 0 for p in up.parts) == k == server.k
    for p in up.parts:
        assert p.enc == "sparse" and len(p.values) == 4 * (p.k or 0)
        assert len(p.pos) == min((p.n + 7) // 8, 2 * (p.k or 0))  # bitmap or index16, whichever is smaller
    envelope = size - sum(p.nbytes() for p in up.parts)  # ids, version, stats, each part's header and crc
    assert 0 < envelope < 200 + 100 * len(up.parts)  # about 430 bytes with this MLP's 3 tensors
    dense = run_strategy("fedavg", StrategyConfig(local_epochs=1), digits, _spec(digits), rounds=1, sample_rate=0.5,
                         seed=0)
    mine = run_strategy("topk", StrategyConfig(local_epochs=1, topk_fraction=fraction), digits, _spec(digits),
                        rounds=1, sample_rate=0.5, seed=0)
    # The same dense model down; each of the 3 tasks names its strategy, "topk" 2 bytes shorter than "fedavg".
    assert mine.downlink_bytes == dense.downlink_bytes - 3 * (len("fedavg") - len("topk"))
    assert mine.uplink_bytes < dense.uplink_bytes * (0.2 if fraction < 0.1 else 0.6)


def test_run_bytes_are_the_encoded_messages(digits: FederatedDataset) -> None:
    """The run's counts are the lengths of the tasks and updates as the halves exchange them."""
    cfg, spec = StrategyConfig(local_epochs=1, topk_fraction=0.1), _spec(digits)
    r = run_strategy("topk", cfg, digits, spec, rounds=2, sample_rate=1.0, seed=0)
    server = get_strategy("topk").server(spec, cfg, seed=0, rounds=2)
    halves = {}
    for d in digits.devices:
        halves[d.device_id] = get_strategy("topk").device(d.device_id, spec, cfg, (d.train.x, d.train.y), 0)
        halves[d.device_id].prepare()
    up = down = 0
    for rnd in (1, 2):
        got = {}
        for d, half in halves.items():
            task = encode_strategy(server.task(rnd, d))
            body = encode_strategy(half.train(decode_strategy(task)))
            down, up, got[d] = down + len(task), up + len(body), decode_strategy(body)
        assert server.fold(rnd, got) == {}
    assert (r.uplink_bytes, r.downlink_bytes) == (up, down)


# -- untrusted updates -----------------------------------------------------------------------
def _with_part(up: StrategyMessage, part: Part) -> StrategyMessage:
    return replace(up, parts=tuple(part if p.name == part.name else p for p in up.parts))


def _hostile(up: StrategyMessage) -> dict[str, tuple[StrategyMessage, str]]:
    first = up.parts[0]
    pos, vals = first.positions(), first.array()
    one_more = int(np.setdiff1d(np.arange(first.n), pos)[0])
    raw_nan = np.array(vals, np.float32)
    raw_nan[0] = np.nan
    return {
        "stale base": (replace(up, model="ab" * 16), "stale_base"),
        "a tensor missing": (replace(up, parts=up.parts[1:]), "missing_field"),
        "an unknown tensor": (replace(up, parts=(*up.parts, sparse_part("fc9", 4, [0], [1.0]))), "unknown_field"),
        "dense, not sparse": (_with_part(up, dense_part(first.name, np.zeros(first.n))), "bad_value"),
        "positions only": (_with_part(up, sparse_part(first.name, first.n, pos)), "bad_value"),
        "another tensor size": (_with_part(up, sparse_part(first.name, first.n + 1, pos, vals)), "bad_value"),
        "one entry too many": (_with_part(up, sparse_part(first.name, first.n, [*pos, one_more], [*vals, 1.0])),
                               "bad_length"),
        "one entry too few": (_with_part(up, sparse_part(first.name, first.n, pos[1:], vals[1:])), "bad_length"),
        # Built in-process, never decoded: what the codec would have refused is refused again.
        "a position past the tensor": (_with_part(up, replace(first, pos_enc="index32", pos=np.array(
            [*pos[:-1], first.n + 5], "<u4").tobytes())), "bad_value"),
        "a value not finite": (_with_part(up, replace(first, values=raw_nan.tobytes())), "bad_value"),
        "more positions than k": (_with_part(up, replace(first, k=(first.k or 0) - 1)), "bad_length"),
    }


def test_malformed_topk_updates_are_refused_with_a_reason(digits: FederatedDataset) -> None:
    server, up, _ = _exchange(digits, StrategyConfig(local_epochs=1, topk_fraction=0.02))
    before = server.w.copy()
    for case, (bad, reason) in _hostile(up).items():
        with pytest.raises(CodecError) as err:
            server.fold(1, {up.device: bad})
        assert err.value.reason == reason, case
    assert np.array_equal(server.w, before)  # nothing refused was folded
    server.fold(1, {up.device: up})
    assert not np.array_equal(server.w, before)
    with pytest.raises(CodecError) as err:  # on the wire the codec refuses a NaN before the strategy sees it
        decode_strategy(encode_strategy(_hostile(up)["a value not finite"][0]))
    assert err.value.reason == "bad_value"


# -- standalone: nothing to send, nothing to fold, no pipeline -------------------------------
def test_standalone_sends_nothing_and_its_server_refuses_any_message(digits: FederatedDataset) -> None:
    strategy, d = get_strategy("standalone"), digits.devices[0]
    server = strategy.server(_spec(digits), StrategyConfig(), seed=0, rounds=1)
    dev = strategy.device(d.device_id, _spec(digits), StrategyConfig(), (d.train.x, d.train.y), 0)
    dev.prepare()
    assert not strategy.device.federated and dev.hello() is None and server.fold(1, {}) == {}
    fake = StrategyMessage(type="supdate", strategy="standalone", device=d.device_id, round=1, model=server.version,
                           stats={"samples": 3})
    for call in (lambda: server.fold(1, {d.device_id: fake}), lambda: server.enrol(replace(fake, type="shello")),
                 lambda: dev.train(replace(fake, type="stask"))):
        with pytest.raises(CodecError) as err:
            call()
        assert err.value.reason == "wrong_type"
    with pytest.raises(CodecError) as err:  # a model for a device that keeps its own
        dev.apply(replace(fake, type="smodel", parts=(dense_part("fc1", [0.0]),), stats={}))
    assert err.value.reason == "forbidden_field"
    with pytest.raises(RuntimeError, match="no rounds"):
        server.task(1, d.device_id)


def test_standalone_has_no_pipeline_and_says_why_before_connecting() -> None:
    with pytest.raises(ValueError, match="nothing to aggregate"):
        strategy_setup("digits", "standalone")
    assert strategy_setup("digits", "topk").cfg.topk_fraction == 0.1  # topk has one
    nowhere = ["--amqp-url", "amqp://u:p@127.0.0.1:1/x"]
    for args in (["aggregator", "run", "--task", "digits", "--redis-url", "redis://127.0.0.1:1/0"],
                 ["worker", "--device-id", "digits-000", "--task", "digits"],
                 ["demo", "--redis-url", "redis://127.0.0.1:1/0"]):
        res = CliRunner().invoke(main, [*args, *nowhere, "--strategy", "standalone"])
        assert res.exit_code != 0 and "nothing to aggregate" in res.output, (args, res.output)
