"""The strategy interface: what one federated-learning method runs on a device and on the server.

A strategy is a pair of halves that only ever talk through encoded messages (shared/strategy_codec.py):

  device half   prepare()                      once, before the first task (build the model, ...)
                hello() -> shello | None       an enrolling strategy's announcement (FedMask: prune once,
                                               send the structure); the others send none
                train(task) -> update          an "stask" in (it carries the model when the device lacks
                                               the version it names), an "supdate" out
                apply(msg)                     adopt an "smodel" downlink
                finish()                       after the last round (FedMask: local adaptation)
  server half   enrol(shello)                  record a device's announcement (default: no payload)
                task(round, device) -> stask   what a sampled device gets (with the model if its copy
                                               is stale: the server tracks the version it last sent)
                fold(round, updates) -> {device: smodel}
                                               fold a round's updates into the state and return each
                                               participant's downlink; a strategy whose state is one
                                               global model returns {} (the next task carries it);
                                               it may also address devices outside the round
                                               (FedPM's final broadcast)
                model_message(device) -> smodel the current state for `device` (evaluation)

Nothing here touches a broker: the simulator (shared/sim/strategy_run.py) and, later, the pipeline
move the bytes. Halves are registered in shared/strategies/__init__.py (one module per method).
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from shared.device import FedMaskConfig
from shared.errors import CodecError
from shared.models import MaskedNet, ModelSpec, build_model
from shared.payloads import Part
from shared.strategy_codec import StrategyMessage
from shared.train import TrainConfig, TrainStats, evaluate


@dataclass(frozen=True)
class StrategyConfig:
    """Every knob of every strategy; each strategy reads its own (defaults: the papers')."""

    train: TrainConfig = field(default_factory=TrainConfig)
    local_epochs: int = 5
    sparsity: float = 0.8          # FedDST: target sparsity S; ZeroFL: SWAT sparsity sp (0.9 there)
    alpha: float = 0.01            # FedDST: readjustment ratio, annealed by a cosine to 0 at anneal_end
    readjust_every: int = 15       # FedDST: R_adj rounds
    anneal_end: float = 0.5        # FedDST: T_end as a fraction of the run's rounds
    density_rule: str = "erk"      # FedDST: per-layer densities, "erk" (RigL's) or "uniform"
    mask_ratio: float = 0.2        # ZeroFL: mr, uploads the top (1 - sp + mr) weights
    unsent: str = "zero"           # ZeroFL: an entry a device did not send counts as "zero" | "holders" | "keep"
    topk_period: int = 10          # ZeroFL: SWAT thresholds refreshed every this many batches
    sparsify_first: bool = False   # ZeroFL: SWAT on the first layer too (default: first dense, last sparse)
    value_dtype: str = "f32"       # dtype of weight values on the wire: "f32" | "f16"
    head_layers: int = 1           # LG-FedAvg: the last this-many tensors are global, the rest stay local
    inner_lr: float = 0.01         # Per-FedAvg: alpha, the inner (and evaluation-time adaptation) step
    outer_lr: float = 0.001        # Per-FedAvg: beta, the outer (meta) step
    bnn_scale: bool = True         # BNN-FedAvg: per-layer scale mean|w| (XNOR-Net's) on the +-1 weights
    topk_fraction: float = 0.1     # Top-k: the share of the weights each update carries (error feedback keeps the rest)
    # Standalone: each device's local epochs in all (run_variant gives a FedMask device's average budget,
    # shared/strategies/standalone.standalone_epochs); 0: local_epochs.
    standalone_epochs: int = 0
    # FedMask (shared/strategies/fedmask.py): the device's own config (None: FedMaskConfig's defaults with
    # `train` and `local_epochs` above), the merge rule, the local adaptation before evaluation, and the
    # agreement rule's last-round broadcast to every device (FedPM's one global model).
    fedmask: FedMaskConfig | None = None
    merge: str = "paper"
    final_local_epochs: int = 0
    broadcast_final: bool = False

    def with_(self, **changes: object) -> StrategyConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


class DeviceHalf(ABC):
    name: ClassVar[str]
    # Whether the device announces itself with a payload before its first task (FedMask: its pruned
    # structure, in an "shello" from hello()); the runner then enrols every device before round 1.
    enrols: ClassVar[bool] = False
    # False: the device never talks to a server (standalone): the runner runs no rounds, builds every
    # device and lets finish() do all of its training.
    federated: ClassVar[bool] = True
    # Fields prepare() builds, which the worker's state file (worker/strategy_runtime.py) skips; a half
    # keeps what they hold beyond the model's tensors through state_arrays() / load_state_arrays().
    derived: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, device_id: str, spec: ModelSpec, cfg: StrategyConfig,
                 train_xy: tuple[np.ndarray, np.ndarray], seed: int,
                 val_xy: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.device_id, self.spec, self.cfg, self.seed = device_id, spec, cfg, seed
        self.x, self.y = train_xy
        # The device's own validation split, for a strategy that chooses on it (fedmask-adapt's share).
        self.val_xy = val_xy
        self.version: str | None = None
        self.last_stats: TrainStats | None = None
        self._model: MaskedNet | None = None

    @property
    def model(self) -> MaskedNet:
        if self._model is None:
            raise RuntimeError("prepare() the device half before using its model")
        return self._model

    def prepare(self) -> None:
        if self._model is None:
            self._model = build_model(dense(self.spec))

    def hello(self) -> StrategyMessage | None:
        """The "shello" an enrolling strategy sends once after prepare(); None for the others."""
        return None

    @abstractmethod
    def train(self, task: StrategyMessage) -> StrategyMessage: ...

    @abstractmethod
    def apply(self, msg: StrategyMessage) -> None: ...

    def finish(self) -> None:  # noqa: B027 - an optional hook: most strategies have nothing to do here
        """After the last round, before evaluation (FedMask: its local adaptation epochs)."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What the derived fields hold beyond the model's tensors, for the worker's state file."""
        return {}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore what state_arrays() gave, after the model's tensors are loaded."""

    def save(self, path: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps no device state file")

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(self.model, x, y)

    def update(self, task: StrategyMessage, parts: list[Part], stats: TrainStats, flops: float,
               dense_flops: float) -> StrategyMessage:
        """The supdate for `task` with the given payload parts and counters."""
        return StrategyMessage(type="supdate", strategy=self.name, device=self.device_id, round=task.round,
                               model=task.model, parts=tuple(parts),
                               stats={"samples": stats.samples, "loss": _finite(stats.loss),
                                      "train_seconds": stats.seconds, "flops": float(flops),
                                      "dense_flops": float(dense_flops)})


class ServerHalf(ABC):
    name: ClassVar[str]
    global_model: ClassVar[bool] = True  # one model for all devices: evaluate it on every device
    # Fields the constructor derives from (spec, cfg, seed, rounds): the aggregator's state store
    # (aggregator/store_strategy.py) does not keep them.
    derived: ClassVar[frozenset[str]] = frozenset()
    # Whether the half needs each enrolled device's structure (FedMask's S_i): the aggregator keeps
    # them per device (RoundStore.register_device), not in the half's state, and hands the half the
    # ones a step touches with adopt() (aggregator/core_strategy.py).
    enrolled_structures: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, cfg: StrategyConfig, *, seed: int, rounds: int) -> None:
        self.spec, self.cfg, self.seed, self.rounds = spec, cfg, seed, rounds
        self.held: dict[str, str] = {}  # device -> the version it was last sent
        # The last round whose fold this state holds: the aggregator saves it with the folded state in
        # one step, so a close resumed after a crash knows whether to fold again (never twice).
        self.closed_round = 0

    version: str  # the current state's version: each server sets it in __init__ and at every fold

    @abstractmethod
    def _parts(self) -> list[Part]:
        """The current state as payload parts: what a stale device's task and model_message carry."""

    def task_params(self) -> dict[str, bool | int | float]:
        """Round parameters a strategy adds to every task (ZeroFL: its sparsity and mask ratio)."""
        return {}

    def task(self, round_id: int, device: str) -> StrategyMessage:
        """`device`'s task: the model travels only when its copy (the version last sent) is stale."""
        stale = self.held.get(device) != self.version
        self.held[device] = self.version
        return StrategyMessage(type="stask", strategy=self.name, device=device, round=round_id, model=self.version,
                               parts=tuple(self._parts()) if stale else (), params=self.task_params())

    def hello_model(self) -> str:
        """What a hello's `model` must name for enrol() (the pipeline's hello carries its settings
        digest instead, checked before: the aggregator puts this in its place)."""
        return self.version

    def adopt(self, device: str, structure: bytes) -> None:
        """Take an enrolled device's structure as the aggregator stored it (enrolled_structures)."""
        raise NotImplementedError(f"{self.name} keeps no per-device structures")

    def enrol(self, hello: StrategyMessage) -> None:
        """Take a device's "shello" (an enrolling strategy records its payload, e.g. a structure)."""
        if hello.parts:
            raise CodecError("forbidden_field", f"{self.name} takes no payload in a hello")

    @abstractmethod
    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]: ...

    def model_message(self, device: str) -> StrategyMessage:
        return StrategyMessage(type="smodel", strategy=self.name, device=device, round=0, model=self.version,
                               parts=tuple(self._parts()))


@dataclass(frozen=True)
class Strategy:
    name: str
    device: type[DeviceHalf]
    server: type[ServerHalf]
    summary: str


# ---------------------------------------------------------------- helpers the strategies share


def dense(spec: ModelSpec) -> ModelSpec:
    """The weight-training form of a spec (shared/sim/baselines.dense_spec: same init, same layers)."""
    return spec.with_(dense=True, init="kaiming_uniform")


def version_of(round_id: int, arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256(str(round_id).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def tensors(model: MaskedNet) -> list[tuple[str, torch.Tensor]]:
    """(name, weight parameter) of every trained tensor, in layout order."""
    return [(t.name, t.weight) for t in model.masked()]


def trained_tensors(model: MaskedNet) -> list[tuple[str, torch.Tensor]]:
    """Every trained parameter of a dense model, in model.parameters() order (the dense baselines'
    vector, shared/sim/baselines.get_vector): the masked tensors by their names, then any other (the
    char LSTM's real-valued gate weights and biases, which tensors() leaves out) by its module path."""
    names = {id(t.weight): t.name for t in model.masked()}
    return [(names.get(id(p), path), p) for path, p in model.named_parameters() if p.requires_grad]


def set_tensor(param: torch.Tensor, flat: np.ndarray) -> None:
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.asarray(flat).reshape(param.shape)))


def load_dense(model: MaskedNet, msg: StrategyMessage, names: frozenset[str] | None = None) -> None:
    """Set the model's tensors (those in `names`, or all) from the message's dense parts; a part of
    another encoding or size is refused as bad_value."""
    for name, param in tensors(model):
        if names is not None and name not in names:
            continue
        part = msg.part(name)
        if part.enc != "dense" or part.n != param.numel():
            raise CodecError("bad_value", f"{name}: expected {param.numel()} dense values")
        set_tensor(param, part.array())


def get_tensor(param: torch.Tensor) -> np.ndarray:
    return param.detach().numpy().reshape(-1).copy()


def linear_sizes(model: MaskedNet) -> list[int]:
    """Elements of each Linear weight, first layer first (FLOP counts cover the MLP's matmuls)."""
    if model.spec.arch != "mlp":
        raise ValueError(f"FLOP counting and sparse training here support the mlp arch, not {model.spec.arch!r}")
    return [t.weight.numel() for t in model.masked()]


def dense_train_flops(sizes: list[int], samples: int) -> float:
    """Multiply-adds x 2 of dense training: forward, dW and dX (no dX for the first layer)."""
    return float(samples) * 2.0 * (3 * sum(sizes) - sizes[0])


def train_loop(model: MaskedNet, x: np.ndarray, y: np.ndarray, epochs: int, cfg: TrainConfig, seed: int,
               after_step: Callable[[], None] | None = None) -> TrainStats:
    """shared/train.local_train for weights (same batch order from PCG64(seed), same optimizers),
    with a hook after every optimizer step (FedDST re-applies its mask there)."""
    torch.set_num_threads(cfg.threads)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.weight_lr)
    elif cfg.weight_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.weight_lr, momentum=cfg.momentum)
    else:
        raise ValueError(f"unknown optimizer {cfg.weight_optimizer!r}; choose adam or sgd")
    rng = np.random.Generator(np.random.PCG64(seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        for lo in range(0, len(y), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            logits = model(xt[idx])
            loss = F.cross_entropy(logits, yt[idx])  # logits: no softmax before the loss
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if after_step is not None:
                after_step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            seen += len(idx)
    model.eval()
    return TrainStats(samples=len(y), loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1),
                      seconds=time.perf_counter() - start)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
