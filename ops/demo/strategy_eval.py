"""The demo's scores for a weight-training strategy (`fedmask demo --strategy S`): each board's state
as its worker left it on disk, with the server's current message for it from Redis, scored on the
board's own test split. This is the simulator's evaluation (shared/sim/strategy_run._scores), so the
figures compare with `fedmask simulate --variant S`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.core_strategy import StrategyCore
from aggregator.store import RoundStore
from ops.fleet.workers import worker_stats
from shared.strategy_codec import decode_strategy, encode_strategy
from shared.strategy_setup import config_fields, strategy_setup
from worker.strategy_runtime import StrategyWorker


def evaluate_strategy_devices(task: str, strategy: str, profiles: dict[str, str], state_dir: Path, seed: int,
                              redis_url: str, planned_rounds: int | None) -> dict[str, dict[str, Any]]:
    from shared.data import load_task
    from shared.presets import preset

    p = preset(task)
    data = {d.device_id: d for d in load_task(task, num_devices=p.devices, seed=seed,
                                              **p.data_options).devices}  # type: ignore[arg-type]
    setup = strategy_setup(task, strategy, seed=seed, rounds=planned_rounds)
    server = StrategyCore(RoundStore.from_url(redis_url), strategy, setup.cfg, setup.spec, seed=seed,
                          rounds=setup.rounds).server()
    out = {}
    for d, profile in profiles.items():
        board = StrategyWorker(d, dict(config_fields(strategy, setup.cfg)), setup.spec,
                               (data[d].train.x, data[d].train.y), seed)
        if (state_dir / f"{d}.npz").exists():
            board.load(state_dir / f"{d}.npz")
        board.half.apply(decode_strategy(encode_strategy(server.model_message(d)), expect_type="smodel"))
        acc = board.half.evaluate(data[d].test.x, data[d].test.y)[1]
        # A strategy has no final adaptation step of the demo's own: both columns hold its evaluation.
        out[d] = {"profile": profile, "mask_version": 0, "accuracy_merged": acc, "accuracy_final": acc,
                  **worker_stats(state_dir, d)}
    return out

