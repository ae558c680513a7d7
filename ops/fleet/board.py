"""One board's worker, as `fedmask worker` runs it on a real board or as one process of a fleet:
the model and training config of the variant (shared/variant_setup.py) or of the strategy
(shared/strategy_setup.py), as the aggregator builds them, and this device's own share of the task's data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from shared.amqp import AmqpSettings
from shared.data import load_task
from shared.errors import FedMaskError
from shared.presets import preset
from shared.strategy_setup import strategy_setup
from shared.variant_setup import PRESET_VARIANT, variant_setup
from worker.runtime import Worker
from worker.strategy_board import StrategyBoard


class NoLocalData(FedMaskError):
    """The device id is not one of the task's devices, so there is nothing for it to train on."""


def board_worker(device_id: str, *, profile: str, task: str, amqp_url: str, state_dir: Path, width: int | None,
                 seed: int, variant: str = PRESET_VARIANT, coding: str = "raw",
                 strategy: str | None = None) -> Worker | StrategyBoard:
    """FedMask's worker, or with `strategy` the board of that weight-training strategy."""
    if strategy is not None and (variant != PRESET_VARIANT or coding != "raw"):
        raise ValueError("--strategy brings its own model and messages: drop --variant and --coding")
    setup = None if strategy is not None else variant_setup(task, variant, width=width, seed=seed)
    if setup is not None and coding == "delta" and setup.fedmask.takes_agreement:
        # DeviceRuntime would quietly send raw bits: refused here so the operator knows.
        raise ValueError(f"--coding delta codes a bit mask against the merged mask both sides hold; variant "
                         f"{setup.variant} takes the agreement downlink (theta as q4 levels), so there is no such "
                         "mask: drop --coding delta")
    p = preset(task)
    data = load_task(task, num_devices=p.devices, seed=seed, **p.data_options)  # type: ignore[arg-type]
    mine = {d.device_id: d for d in data.devices}.get(device_id)
    if mine is None:
        raise NoLocalData(f"no local data for {device_id!r}; {task} devices are "
                          f"{', '.join(d.device_id for d in data.devices[:5])}, ...")
    if strategy is not None:
        return StrategyBoard(device_id, strategy_setup(task, strategy, width=width, seed=seed),
                             (mine.train.x, mine.train.y), amqp=AmqpSettings.from_url(amqp_url),
                             state_dir=state_dir, seed=seed, profile=profile)
    assert setup is not None  # no strategy: a variant's
    return Worker(device_id, setup.spec, replace(setup.fedmask, coding=coding), (mine.train.x, mine.train.y),
                  amqp=AmqpSettings.from_url(amqp_url), state_dir=state_dir, seed=seed, profile=profile,
                  variant=setup.variant, val_xy=(mine.val.x, mine.val.y))
