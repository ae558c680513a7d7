"""The strategy interface and its wire payloads: parts round-trip (the sparse positions' bitmap or
index list, whichever is smaller; float16), hostile parts are refused with a reason, halves talk only
through encoded messages, and FedAvg through the interface is the baseline, bit for bit."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from shared import codec
from shared.data import FederatedDataset, load_task
from shared.errors import CodecError
from shared.models import ModelSpec
from shared.payloads import bits_part, dense_part, part_from_wire, part_to_wire, sparse_part
from shared.presets import preset
from shared.sim.baselines import run_baseline
from shared.sim.strategy_run import run_strategy
from shared.sim.variants import STRATEGY_VARIANTS, VARIANTS, default_config, run_variant
from shared.strategies import STRATEGIES, StrategyConfig, get_strategy
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_task("digits", num_devices=6, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=16)


def _roundtrip(part: object) -> object:
    return part_from_wire(msgpack.unpackb(msgpack.packb(part_to_wire(part)), raw=False))  # type: ignore[arg-type]


# -- payload parts ---------------------------------------------------------------------------
def test_sparse_positions_take_the_smaller_of_bitmap_and_index_list() -> None:
    rng = np.random.default_rng(0)
    n = 1000  # bitmap: 125 bytes; index16: 2 bytes per entry
    few = sparse_part("w", n, rng.choice(n, 10, replace=False), np.ones(10))
    many = sparse_part("w", n, rng.choice(n, 300, replace=False), np.ones(300))
    assert (few.pos_enc, len(few.pos)) == ("index16", 20)
    assert (many.pos_enc, len(many.pos)) == ("bitmap", 125)
    big = sparse_part("w", 70_000, [5, 69_999], [1.0, 2.0])  # past 2**16 entries: 4-byte indices
    assert (big.pos_enc, len(big.pos)) == ("index32", 8)
    for p in (few, many, big):
        back = _roundtrip(p)
        assert back == p
        assert np.array_equal(back.full(), p.full())  # type: ignore[attr-defined]


def test_sparse_values_follow_their_positions_and_float16_rounds_like_numpy() -> None:
    pos = np.array([7, 2, 40])
    vals = np.array([0.1, -3.0, 1e-3], np.float32)
    p = _roundtrip(sparse_part("w", 50, pos, vals))
    assert list(p.positions()) == [2, 7, 40] and list(p.array()) == [-3.0, 0.1, np.float32(1e-3)]  # type: ignore[attr-defined]
    h = _roundtrip(dense_part("w", vals, "f16"))
    assert len(h.values) == 6  # type: ignore[attr-defined]
    assert np.array_equal(h.array(), vals.astype(np.float16).astype(np.float32))  # type: ignore[attr-defined]
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], bool)
    assert np.array_equal(_roundtrip(bits_part("m", bits)).bits(), bits)  # type: ignore[attr-defined]
    only = _roundtrip(sparse_part("flip", 9, [3, 1]))  # positions only
    assert only.dtype == "none" and list(only.positions()) == [1, 3]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "reason"), [
    ({"crc32": 0}, "bad_crc"),
    ({"k": 4}, "bad_length"),
    ({"pos": np.array([3, 1, 2], "<u2").tobytes()}, "bad_value"),       # not increasing
    ({"values": np.array([1, np.nan, 2], "<f4").tobytes()}, "bad_value"),
    ({"n": True}, "bad_type"),
    ({"dtype": "f64"}, "bad_value"),
    ({"extra": 1}, "unknown_field"),
])
def test_a_hostile_sparse_part_is_refused_with_a_reason(change: dict[str, object], reason: str) -> None:
    wire = part_to_wire(sparse_part("w", 100, [1, 2, 3], [1.0, 2.0, 3.0]))
    wire.update(change)
    if "crc32" not in change and reason != "bad_crc":
        wire["crc32"] = __import__("zlib").crc32(wire.get("pos", b"") + wire["values"])
    with pytest.raises(CodecError) as err:
        part_from_wire(wire)
    assert err.value.reason == reason


def test_bitmap_padding_and_count_are_checked() -> None:
    wire = part_to_wire(sparse_part("w", 12, list(range(8)), np.ones(8)))
    assert wire["pos_enc"] == "bitmap"
    wire["pos"] = bytes([0xFF, 0x01])  # a padding bit set
    wire["crc32"] = __import__("zlib").crc32(wire["pos"] + wire["values"])
    with pytest.raises(CodecError, match="padding"):
        part_from_wire(wire)


def test_strategy_messages_are_registered_in_the_codec_and_checked_both_ways() -> None:
    assert codec.PAYLOAD_ENCODINGS == ("bits", "dense", "sparse")
    assert codec.STRATEGY_TYPES == ("stask", "supdate", "smodel", "shello")
    msg = StrategyMessage(type="supdate", strategy="zerofl", device="d1", round=3, model="ab" * 8,
                          parts=(sparse_part("fc1", 10, [1], [2.0]),), stats={"samples": 4, "flops": 1.0})
    assert codec.decode_strategy(codec.encode_strategy(msg)) == msg
    with pytest.raises(CodecError) as err:
        encode_strategy(StrategyMessage(type="stask", strategy="x", device="d", round=1, model="ab" * 8,
                                        stats={"samples": 1}))
    assert err.value.reason == "forbidden_field"
    with pytest.raises(CodecError) as err:
        decode_strategy(encode_strategy(msg), expect_type="stask")
    assert err.value.reason == "wrong_type"
    twice = StrategyMessage(type="smodel", strategy="x", device="d", round=1, model="ab" * 8,
                            parts=(dense_part("a", [1.0]), dense_part("a", [2.0])))
    with pytest.raises(CodecError, match="repeat"):
        encode_strategy(twice)


# -- the interface ---------------------------------------------------------------------------
def test_every_strategy_variant_is_registered_and_runs(digits: FederatedDataset) -> None:
    assert set(STRATEGY_VARIANTS) <= set(VARIANTS) and set(STRATEGY_VARIANTS) <= set(STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("nope")
    for v in STRATEGY_VARIANTS:
        cfg = default_config(v, preset("digits")).with_(local_epochs=1)
        r = run_variant(cfg, digits, _spec(digits), rounds=2, sample_rate=0.5, seed=1)
        assert r.method == v and math.isfinite(r.personalized_accuracy) and r.uplink_bytes > 0
        assert 0 < r.extra["train_flops"] <= r.extra["dense_train_flops"]
        assert (r.extra["train_flops"] < r.extra["dense_train_flops"]) == (v in ("feddst", "zerofl"))


def test_a_task_carries_the_model_only_when_the_device_copy_is_stale(digits: FederatedDataset) -> None:
    server = get_strategy("fedavg").server(_spec(digits), StrategyConfig(), seed=0, rounds=2)
    first = server.task(1, "a")
    assert first.parts and not server.task(1, "a").parts  # same version: nothing to send again
    server.fold(1, {"a": decode_strategy(encode_strategy(_trained(digits, first)))})
    assert server.task(2, "a").parts and server.task(2, "a").model != first.model


def _trained(data: FederatedDataset, task: StrategyMessage) -> StrategyMessage:
    d = data.devices[0]
    dev = get_strategy("fedavg").device(task.device, _spec(data), StrategyConfig(local_epochs=1),
                                        (d.train.x, d.train.y), 0)
    dev.prepare()
    return dev.train(task)


def test_fedavg_through_the_interface_is_the_baseline_bit_for_bit(digits: FederatedDataset) -> None:
    """The regression check for moving FedAvg onto the interface: same accuracies on every device."""
    train = preset("digits").dense_train
    base = run_baseline("fedavg", digits, _spec(digits), train, rounds=3, sample_rate=0.5, local_epochs=2, seed=3)
    mine = run_strategy("fedavg", StrategyConfig(train=train, local_epochs=2), digits, _spec(digits), rounds=3,
                        sample_rate=0.5, seed=3)
    assert mine.per_device_accuracy == base.per_device_accuracy
    assert mine.validation_accuracy == base.validation_accuracy
    assert mine.extra["flops_ratio"] == 1.0  # dense training is counted as dense


@pytest.mark.parametrize("final", [0, 1])
def test_fedavg_ft_through_the_interface_is_the_baseline_bit_for_bit(digits: FederatedDataset, final: int) -> None:
    train = preset("digits").dense_train
    base = run_baseline("fedavg-ft", digits, _spec(digits), train, rounds=3, sample_rate=0.5, local_epochs=2, seed=3,
                        final_local_epochs=final)
    mine = run_strategy("fedavg-ft", StrategyConfig(train=train, local_epochs=2, final_local_epochs=final), digits,
                        _spec(digits), rounds=3, sample_rate=0.5, seed=3)
    assert mine.per_device_accuracy == base.per_device_accuracy
    assert mine.validation_accuracy == base.validation_accuracy
    # Every task carries the model (each round changes it), and every device downloads the final model once
    # more (the baseline's count); each says hello once.
    assert mine.extra["downloads"] == mine.extra["updates"] + len(digits.devices)
    assert mine.extra["hello_bytes"] > 0


def test_fedavg_ft_refuses_a_device_built_from_other_weights(digits: FederatedDataset) -> None:
    strategy = get_strategy("fedavg-ft")
    server = strategy.server(_spec(digits), StrategyConfig(), seed=0, rounds=1)
    dev = strategy.device("d", _spec(digits).with_(seed=1), StrategyConfig(), (digits.devices[0].train.x,
                                                                              digits.devices[0].train.y), 0)
    dev.prepare()
    hello = dev.hello()
    assert hello is not None
    with pytest.raises(CodecError) as err:
        server.enrol(hello)
    assert err.value.reason == "wrong_model"


def test_a_run_is_deterministic(digits: FederatedDataset) -> None:
    cfg = StrategyConfig(local_epochs=1, sparsity=0.9)
    a = run_strategy("zerofl", cfg, digits, _spec(digits), rounds=2, sample_rate=0.5, seed=2)
    b = run_strategy("zerofl", cfg, digits, _spec(digits), rounds=2, sample_rate=0.5, seed=2)
    assert (a.per_device_accuracy, a.uplink_bytes, a.downlink_bytes) == (b.per_device_accuracy, b.uplink_bytes,
                                                                         b.downlink_bytes)


def test_lg_fedavg_sends_only_the_head_and_keeps_the_body_local(digits: FederatedDataset) -> None:
    spec, cfg = _spec(digits), StrategyConfig(local_epochs=1, head_layers=1)
    strategy = get_strategy("lg-fedavg")
    server = strategy.server(spec, cfg, seed=0, rounds=1)
    devs, ups = {}, {}
    for d in digits.devices[:2]:
        devs[d.device_id] = dev = strategy.device(d.device_id, spec, cfg, (d.train.x, d.train.y), 0)
        dev.prepare()
        task = decode_strategy(encode_strategy(server.task(1, d.device_id)))
        assert [p.name for p in task.parts] == ["fc3"]
        ups[d.device_id] = decode_strategy(encode_strategy(dev.train(task)))
        assert [p.name for p in ups[d.device_id].parts] == ["fc3"]
    server.fold(1, ups)
    n = [float(u.stats["samples"]) for u in ups.values()]
    heads = [u.part("fc3").array() for u in ups.values()]
    assert np.allclose(server.w[0], (n[0] * heads[0] + n[1] * heads[1]) / sum(n), atol=1e-6)
    a, b = ({m.name: m.weight.detach().numpy().copy() for m in dv.model.masked()} for dv in devs.values())
    assert not np.array_equal(a["fc1"], b["fc1"])  # bodies stay personal
    r = run_strategy("lg-fedavg", cfg, digits, spec, rounds=2, sample_rate=0.5, seed=0)
    assert math.isfinite(r.personalized_accuracy) and r.uplink_bits_per_param < 32 * 0.2


def test_a_settings_run_parses_its_overrides() -> None:
    from ops.bench.strategy_settings import parse_setting

    assert parse_setting("first:unsent=holders,sparsify_first=true,mask_ratio=0.1") == (
        "first", {"unsent": "holders", "sparsify_first": True, "mask_ratio": 0.1})
    with pytest.raises(ValueError, match="no name"):
        parse_setting(":unsent=zero")
