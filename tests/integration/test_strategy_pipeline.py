"""Weight-training strategies through Redis (aggregator/core_strategy.py, aggregator/store_strategy.py):
3 devices x 3 rounds per strategy give run_strategy's accuracies and byte counts exactly, and the
final model equals an in-memory server's bit for bit, though every step rebuilds the server half
from Redis. Untrusted updates are refused with a reason and never stored."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.core_strategy import StrategyCore, config_fields
from aggregator.store import RoundStore, StoreError
from shared.data import FederatedDataset, load_task
from shared.errors import ConfigError
from shared.models import ModelSpec
from shared.rounds import sample_count, sample_devices
from shared.sim.strategy_run import _scores, run_strategy
from shared.strategies import get_strategy
from shared.strategies.base import DeviceHalf, StrategyConfig
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from worker.strategy_runtime import StrategyWorker

ROUNDS, SEED = 3, 4


@pytest.fixture(scope="module")
def fleet() -> FederatedDataset:
    return load_task("digits", num_devices=3, seed=0)


def _spec(data: FederatedDataset) -> ModelSpec:
    return ModelSpec("mlp", data.input_shape, data.num_classes, width=16)


def _cfg(name: str) -> StrategyConfig:
    # FedDST readjusts every 2 rounds here so the 3-round run exercises a mask change and its versions
    return StrategyConfig(local_epochs=1, readjust_every=2, alpha=0.2) if name == "feddst" else \
        StrategyConfig(local_epochs=1)


def _devices(name: str, data: FederatedDataset, spec: ModelSpec, cfg: StrategyConfig) -> dict[str, DeviceHalf]:
    out = {}
    for d in data.devices:
        half = get_strategy(name).device(d.device_id, spec, cfg, (d.train.x, d.train.y), SEED)
        half.prepare()
        out[d.device_id] = half
    return out


@pytest.mark.parametrize("name", ["fedavg", "topk", "feddst", "zerofl", "lg-fedavg"])
def test_three_rounds_through_redis_equal_the_simulator(name: str, fleet: FederatedDataset,
                                                        store: RoundStore, tmp_path: Path) -> None:
    spec, cfg = _spec(fleet), _cfg(name)
    core = StrategyCore(store, name, cfg, spec, seed=SEED, rounds=ROUNDS)
    store.set_config(dict(config_fields(name, cfg)))
    reference = get_strategy(name).server(spec, cfg, seed=SEED, rounds=ROUNDS)  # never persisted
    by_id = {d.device_id: d for d in fleet.devices}
    ids = list(by_id)

    def worker(d: str) -> StrategyWorker:  # a board restarted every step: config from Redis, state from .npz
        return StrategyWorker(d, store.config(), spec, (by_id[d].train.x, by_id[d].train.y), SEED,
                              state_path=tmp_path / f"{d}.npz")

    up = down = 0
    for r in range(1, ROUNDS + 1):
        sampled = sample_devices(ids, sample_count(len(ids), rate=1.0), seed=SEED, round_id=r)
        now = time.time()
        tasks = core.open_round(r, sampled, now=now, deadline=now + 600, quorum=len(sampled))
        elected = []
        received: dict[str, StrategyMessage] = {}
        for d in sampled:
            assert tasks[d] == encode_strategy(reference.task(r, d))
            down += len(tasks[d])
            body = worker(d).handle(tasks[d])
            assert body is not None
            up += len(body)
            received[d] = decode_strategy(body, expect_type="supdate")
            admission = core.ingest(body, time.time())
            assert (admission.status, admission.reason) == ("stored", "")
            assert core.ingest(body, time.time()).status in ("duplicate", "closed")  # SET NX: a redelivery
            elected.append(admission.elected)
        assert elected == [False] * (len(sampled) - 1) + [True]  # the quorum elects exactly one closer
        downlinks = core.close(r, time.time())
        expected = {d: encode_strategy(m) for d, m in reference.fold(r, received).items()}
        assert downlinks == expected
        for d, body in downlinks.items():
            down += len(body)
            assert worker(d).handle(body) is None
        info = store.info(r)
        assert info is not None and info.state == "closed" and info.received == sorted(sampled)
    for d in ids:
        assert core.model_message(d) == encode_strategy(reference.model_message(d))  # bit for bit
    sim = run_strategy(name, cfg, fleet, spec, rounds=ROUNDS, sample_rate=1.0, seed=SEED)
    assert (up, down) == (sim.uplink_bytes, sim.downlink_bytes)
    evaluator = get_strategy(name).device("evaluator", spec, cfg, (np.zeros((0,)), np.zeros((0,))), SEED)
    evaluator.prepare()
    devices = {d: worker(d).half for d in ids}
    assert _scores(core.server(), evaluator, devices, fleet, "test") == sim.per_device_accuracy


def test_untrusted_updates_are_refused_with_a_reason(fleet: FederatedDataset, store: RoundStore) -> None:
    spec, cfg = _spec(fleet), StrategyConfig(local_epochs=1)
    core = StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2, max_update_bytes=1 << 20)
    devices = _devices("fedavg", fleet, spec, cfg)
    ids = sorted(devices)
    tasks = core.open_round(1, ids, now=time.time(), deadline=time.time() + 600, quorum=3)
    good = devices[ids[0]].train(decode_strategy(tasks[ids[0]], expect_type="stask"))

    def refused(msg: StrategyMessage | bytes) -> str:
        body = msg if isinstance(msg, bytes) else encode_strategy(msg)
        a = core.ingest(body, time.time())
        assert a.status == "rejected"
        return a.reason

    assert refused(b"\x93garbage") == "undecodable"
    assert refused(b"\x00" * ((1 << 20) + 1)) == "too_large"
    assert refused(decode_strategy(tasks[ids[0]])) == "wrong_type"
    assert refused(StrategyMessage(**{**_fields(good), "model": "ab" * 16})) == "stale_base"
    assert refused(StrategyMessage(**{**_fields(good), "strategy": "feddst"})) == "wrong_strategy"
    assert refused(StrategyMessage(**{**_fields(good), "parts": good.parts[:-1]})) == "missing_field"
    assert store.updates(1) == {}  # nothing refused was stored
    assert core.ingest(encode_strategy(good), time.time()).status == "stored"
    # a device never sent this round's task has no base version here: stale_base, not stored
    outsider = StrategyMessage(**{**_fields(good), "device": "not-enrolled"})
    assert refused(outsider) == "stale_base"


def _fields(m: StrategyMessage) -> dict[str, object]:
    return {"type": m.type, "strategy": m.strategy, "device": m.device, "round": m.round, "model": m.model,
            "parts": m.parts, "params": m.params, "stats": m.stats}


def test_stored_state_is_never_unpickled_and_belongs_to_its_strategy(fleet: FederatedDataset,
                                                                     store: RoundStore) -> None:
    spec, cfg = _spec(fleet), StrategyConfig(local_epochs=1)
    core = StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2)
    core.server()  # writes the initial state
    with pytest.raises(StoreError, match="not 'feddst'"):
        StrategyCore(store, "feddst", cfg, spec, seed=SEED, rounds=2).server()
    key = store.keys.key("strategy:tensor:w")
    buf = io.BytesIO()  # a pickled payload in .npy form: what an attacker with Redis access could plant
    np.lib.format.write_array(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    store.client.set(key, buf.getvalue())
    # A replica or a restarted aggregator reads it (this core keeps the half it built while the state's
    # JSON is unchanged, so it never reads the planted tensor at all).
    with pytest.raises(StoreError, match="does not decode"):
        StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2).server()


def test_a_board_refuses_a_message_for_another_device_or_strategy(fleet: FederatedDataset,
                                                                   store: RoundStore, tmp_path: Path) -> None:
    spec, cfg = _spec(fleet), StrategyConfig(local_epochs=1)
    core = StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2)
    d0, d1 = (d.device_id for d in fleet.devices[:2])
    tasks = core.open_round(1, [d0, d1], now=time.time(), deadline=time.time() + 600, quorum=2)
    board = StrategyWorker(d0, dict(config_fields("fedavg", cfg)), spec,
                           (fleet.devices[0].train.x, fleet.devices[0].train.y), SEED)
    with pytest.raises(ConfigError, match="not for this fedavg device"):
        board.handle(tasks[d1])
    with pytest.raises(ConfigError, match="unknown settings"):
        StrategyWorker(d0, {"strategy": "fedavg", "strategy_config": '{"rounds_x": 1}'}, spec,
                       (fleet.devices[0].train.x, fleet.devices[0].train.y), SEED)
    assert board.handle(tasks[d0]) is not None


def test_a_cached_half_follows_another_replicas_writes(fleet: FederatedDataset, store: RoundStore) -> None:
    """StrategyCore keeps the half it built while Redis holds the same state JSON: a copy each call
    (changing one leaves the next untouched), and another replica's save is seen at the next call."""
    spec, cfg = _spec(fleet), StrategyConfig(local_epochs=1)
    a = StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2)
    b = StrategyCore(store, "fedavg", cfg, spec, seed=SEED, rounds=2)
    first = a.server()
    first.held["someone"] = "changed in memory only"
    assert "someone" not in a.server().held
    d0 = fleet.devices[0].device_id
    b.open_round(1, [d0], now=time.time(), deadline=time.time() + 600, quorum=1)  # saves held[d0]
    assert a.server().held == {d0: b.server().version}
