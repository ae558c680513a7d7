"""FedAvg-FT as a strategy: FedAvg's rounds (shared/strategies/fedavg.py), then every device downloads
the final global model and fine-tunes it on its own data before evaluation. The arithmetic and the
seeds are shared/sim/baselines.py's, so a run through this interface gives the baseline's accuracies
exactly (tests/unit/test_strategies.py checks it).

Wire: FedAvg's, plus an empty "shello" per device (the server must know the whole fleet to send each
device the final model; `model` names the initial global version, so a device built with other
weights is refused) and, at the last round's fold, the global model as an "smodel" to every device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.device import derive_seed
from shared.errors import CodecError
from shared.strategies.base import get_tensor, trained_tensors, version_of
from shared.strategies.fedavg import FedAvgDevice, FedAvgServer
from shared.strategy_codec import StrategyMessage
from shared.train import local_train

NAME = "fedavg-ft"


class FedAvgFTDevice(FedAvgDevice):
    name = NAME
    enrols = True

    def hello(self) -> StrategyMessage:
        initial = version_of(0, [np.concatenate([get_tensor(p) for _, p in trained_tensors(self.model)])])
        return StrategyMessage(type="shello", strategy=NAME, device=self.device_id, round=0, model=initial)

    def apply(self, msg: StrategyMessage) -> None:
        if msg.parts:  # the evaluation message is empty: the device keeps its fine-tuned weights
            super().apply(msg)

    def finish(self) -> None:
        """Fine-tune the final global model: final_local_epochs (0: local_epochs, the preset's choice)."""
        epochs = self.cfg.final_local_epochs or self.cfg.local_epochs
        self.last_stats = local_train(self.model, self.x, self.y, epochs, self.cfg.train,
                                      seed=derive_seed(self.seed, "ft", self.device_id))


class FedAvgFTServer(FedAvgServer):
    name = NAME
    global_model = False  # each device is evaluated with its own fine-tuned copy

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.initial = self.version
        self.fleet: list[str] = []  # every enrolled device: the final model goes to each

    def enrol(self, hello: StrategyMessage) -> None:
        super().enrol(hello)  # no payload
        if hello.model != self.initial:
            raise CodecError("wrong_model", f"{hello.device} starts from {hello.model}, not {self.initial}")
        if hello.device not in self.fleet:
            self.fleet = sorted([*self.fleet, hello.device])

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        super().fold(round_id, updates)
        if round_id != self.rounds:
            return {}
        return {d: StrategyMessage(type="smodel", strategy=NAME, device=d, round=round_id, model=self.version,
                                   parts=tuple(self._parts())) for d in self.fleet}

    def model_message(self, device: str) -> StrategyMessage:
        return StrategyMessage(type="smodel", strategy=NAME, device=device, round=0, model=self.version)
