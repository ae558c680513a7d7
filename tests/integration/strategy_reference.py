"""The reference check of a weight-training strategy through the real pipeline (tests/integration/
test_strategy_broker.py, tests/faults/test_strategy_kill.py): ROUNDS rounds driven by `fedmask round
run` must equal the simulator's `run_strategy` on the same devices bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.core_strategy import StrategyCore
from aggregator.store import RoundStore
from shared.data import FederatedDataset
from shared.sim.strategy_run import _scores, run_strategy
from shared.strategies import get_strategy
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import config_fields, strategy_setup
from tests.integration.pipeline_fleet import SEED, TASK, WIDTH, cli, subset, wait
from worker.strategy_runtime import StrategyWorker

ROUNDS, BOARDS = 3, 3


def _records(state_dir: Path, device: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state_dir / f"{device}.stats.jsonl").read_text().splitlines()]


def assert_pipeline_equals_simulator(pipeline: dict[str, Any], redis_service_url: str, *,
                                     bytes_equal: bool = True) -> None:
    """Drive ROUNDS rounds with `fedmask round run` and check the outcome against the simulator:
    every board's saved model, the server's state and version, the per-device test accuracies and
    (with `bytes_equal`) the bytes the workers logged. `pipeline["during_run"]`, when given, is called
    with the running `round run` process (a fault test kills and restarts the aggregator there)."""
    store: RoundStore = pipeline["store"]
    ids: list[str] = pipeline["ids"]
    name: str = pipeline["strategy"]
    state = pipeline["tmp"] / "state"
    wait(lambda: sorted(store.device_ids()) == sorted(ids), 180, "every worker's hello")
    assert store.config()["strategy"] == name
    urls = ["--amqp-url", pipeline["admin_url"], "--redis-url", redis_service_url]
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "round", "run", "--rounds", str(ROUNDS), "--quorum",
                             "1.0", "--deadline", "240", "--json", *urls], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if pipeline.get("during_run") is not None:
        pipeline["during_run"](proc)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    summaries = [json.loads(line) for line in stdout.splitlines()]
    assert [(x["round"], x["state"], x["received"]) for x in summaries] == [(r, "closed", BOARDS)
                                                                           for r in range(1, ROUNDS + 1)]
    setup = strategy_setup(TASK, name, width=WIDTH, seed=SEED, rounds=ROUNDS)
    data: FederatedDataset = subset(pipeline["data"], ids)
    by_id = {d.device_id: d for d in data.devices}

    # The same run in memory, step by step: the reference for the boards' weights and downlink counts.
    reference = get_strategy(name).server(setup.spec, setup.cfg, seed=SEED, rounds=ROUNDS)
    halves, models_sent = {}, dict.fromkeys(ids, 0)
    for d in ids:
        halves[d] = get_strategy(name).device(d, setup.spec, setup.cfg, (by_id[d].train.x, by_id[d].train.y), SEED)
        halves[d].prepare()
        if get_strategy(name).device.enrols:  # as run_strategy: FedMask prunes and announces the structure
            hello = halves[d].hello()
            assert hello is not None
            reference.enrol(_wire(hello))
    for r in range(1, ROUNDS + 1):
        received = {d: _wire(halves[d].train(_wire(reference.task(r, d)))) for d in ids}
        for d, msg in reference.fold(r, received).items():  # {} for a strategy whose tasks carry the model
            halves[d].apply(_wire(msg))
            models_sent[d] += 1

    def settled() -> bool:  # every board has sent its updates and applied and saved every model sent
        return all(sum(r["type"] == "model" for r in _records(state, d)) == models_sent[d]
                   and sum(r["type"] == "update" for r in _records(state, d)) == ROUNDS for d in ids)
    wait(settled, 60, "workers to apply and save the last downlink")

    sim = run_strategy(name, setup.cfg, data, setup.spec, rounds=ROUNDS, sample_rate=1.0, seed=SEED)
    up = sum(r["bytes_up"] for d in ids for r in _records(state, d) if r["type"] == "update")
    if get_strategy(name).device.enrols:  # the simulator counts each device's one hello (the structure)
        up += sum(next(r["bytes_up"] for r in _records(state, d) if r["type"] == "hello") for d in ids)
    down = sum(r["bytes_down"] for d in ids for r in _records(state, d) if r["type"] in ("task", "model"))
    if bytes_equal:
        assert (up, down) == (sim.uplink_bytes, sim.downlink_bytes)

    boards = {}
    for d in ids:  # each board's saved state, as a restarted worker would load it
        w = StrategyWorker(d, dict(config_fields(name, setup.cfg)), setup.spec,
                           (by_id[d].train.x, by_id[d].train.y), SEED)
        w.load(state / f"{d}.npz")
        boards[d] = w.half
    server = StrategyCore(store, name, setup.cfg, setup.spec, seed=SEED, rounds=ROUNDS).server()
    assert server.closed_round == ROUNDS
    # Models first: evaluation (_scores) loads the server's current message into each board.
    assert server.version == reference.version
    for d in ids:
        mine, theirs = boards[d].model.state_dict(), halves[d].model.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert np.array_equal(mine[key].numpy(), theirs[key].numpy()), f"{name} {d}: {key} differs"

    evaluator = get_strategy(name).device("evaluator", setup.spec, setup.cfg, (np.zeros((0,)), np.zeros((0,))), SEED)
    evaluator.prepare()
    assert _scores(server, evaluator, boards, data, "test") == sim.per_device_accuracy

    shown = cli("round", "status", "--redis-url", redis_service_url)
    assert shown.returncode == 0 and f"strategy {name}" in shown.stdout, shown.stdout + shown.stderr


def _wire(msg: StrategyMessage) -> StrategyMessage:
    """What the other side receives: the message encoded and decoded, as between processes."""
    return decode_strategy(encode_strategy(msg))
