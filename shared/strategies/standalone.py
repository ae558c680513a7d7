"""Standalone as a strategy: every device trains the dense model on its own data and never talks to a
server: no hello, no task, no update, no model, 0 bytes each way (as shared/sim/baselines.py counts it).
Its budget is what a FedMask device trains on average (standalone_epochs below), in one local_train call
with the baseline's seed, so a run through this interface gives the baseline's accuracies exactly
(tests/unit/test_baseline_strategies.py).

The device half declares `federated = False`: the runner (shared/sim/strategy_run.py) builds every device,
runs no rounds and calls finish(), which does all the training. The server half holds nothing, so it has
nothing to fold: it refuses any hello or update (wrong_type), and the pipeline has no standalone
(shared/strategy_setup.py refuses it with the reason).
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.device import derive_seed
from shared.errors import CodecError
from shared.payloads import Part
from shared.strategies.base import DeviceHalf, ServerHalf, version_of
from shared.strategy_codec import StrategyMessage
from shared.train import local_train

NAME = "standalone"


def standalone_epochs(local_epochs: int, rounds: int, sample_rate: float, final_local_epochs: int) -> int:
    """A FedMask device's average training: 1 pruning epoch, local_epochs for each round it is sampled
    (rounds x sample_rate on average) and its final local adaptation."""
    return 1 + round(local_epochs * rounds * sample_rate) + final_local_epochs


class StandaloneDevice(DeviceHalf):
    name = NAME
    federated = False

    def train(self, task: StrategyMessage) -> StrategyMessage:
        raise CodecError("wrong_type", f"{NAME} runs no rounds: a task is not for it")

    def apply(self, msg: StrategyMessage) -> None:
        if msg.parts:  # the evaluation message is empty: the device keeps its own model
            raise CodecError("forbidden_field", f"{NAME} takes no model: each device keeps its own")

    def finish(self) -> None:
        """All of the device's training: standalone_epochs (0: local_epochs) on its own data."""
        epochs = self.cfg.standalone_epochs or self.cfg.local_epochs
        self.last_stats = local_train(self.model, self.x, self.y, epochs, self.cfg.train,
                                      seed=derive_seed(self.seed, NAME, self.device_id))


class StandaloneServer(ServerHalf):
    name = NAME
    global_model = False  # each device is evaluated with its own model

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.version = version_of(0, [])  # a constant: there is no state to version

    def _parts(self) -> list[Part]:
        return []

    def task(self, round_id: int, device: str) -> StrategyMessage:
        raise RuntimeError(f"{NAME} runs no rounds: there is no task to send")

    def enrol(self, hello: StrategyMessage) -> None:
        raise CodecError("wrong_type", f"{NAME} devices send nothing: a hello from {hello.device} is not for it")

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        if updates:
            raise CodecError("wrong_type", f"{NAME} takes no updates (from {', '.join(sorted(updates))[:64]}): "
                             "its devices train on their own data only")
        return {}
