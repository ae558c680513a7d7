"""StrategyWorker: the device half of a weight-training strategy on a board (issue 12, roadmap item 3).

The strategy and its settings come from fm:config (`strategy`, `strategy_config`, written by the
aggregator: aggregator/core_strategy.config_fields), so a board runs whatever its aggregator runs.
handle() takes one downlink body (`stask` -> the encoded `supdate` to send; `smodel` -> applied, None),
decoding it with the strategy codec's checks: the aggregator is trusted less than nothing on the wire.

State (the model's tensors, the half's own arrays such as FedDST's masks, its version, and what its
derived fields hold through DeviceHalf.state_arrays: FedMask's structure, so a re-hello is the same) is saved
with np.savez and read back with allow_pickle=False, so a restarted board continues where it was.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from shared.device import FedMaskConfig
from shared.errors import ConfigError
from shared.models import ModelSpec
from shared.strategies import get_strategy
from shared.strategies.base import DeviceHalf, StrategyConfig
from shared.strategy_codec import decode_strategy, encode_strategy
from shared.train import TrainConfig

_CONSTRUCTOR_FIELDS: Final = frozenset({"device_id", "spec", "cfg", "seed", "x", "y", "_model", "last_stats"})


def strategy_config_from(config: dict[str, str]) -> tuple[str, StrategyConfig]:
    """(strategy name, its settings) from fm:config; ConfigError naming what is wrong."""
    name = config.get("strategy", "fedmask")
    get_strategy(name)  # ValueError for an unknown name, before anything is built
    try:
        raw: dict[str, Any] = json.loads(config.get("strategy_config", "{}"))
        known = {f.name for f in fields(StrategyConfig)}
        if unknown := sorted(set(raw) - known):
            raise ConfigError(f"strategy_config: unknown settings {unknown}")
        train = TrainConfig(**raw.pop("train", {}))
        fm = raw.pop("fedmask", None)
        fedmask = None if fm is None else _fedmask_config(fm)
        return name, StrategyConfig(train=train, fedmask=fedmask, **raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"strategy_config in fm:config is not valid: {exc}") from None


def _fedmask_config(raw: dict[str, Any]) -> FedMaskConfig:
    """The nested FedMask device config as asdict() wrote it (share_grid a JSON list, train a map)."""
    known = {f.name for f in fields(FedMaskConfig)}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"strategy_config.fedmask: unknown settings {unknown}")
    grid = tuple(float(v) for v in raw.pop("share_grid", ()))
    return FedMaskConfig(train=TrainConfig(**raw.pop("train", {})), share_grid=grid, **raw)


class StrategyWorker:
    def __init__(self, device_id: str, config: dict[str, str], spec: ModelSpec,
                 train_xy: tuple[np.ndarray, np.ndarray], seed: int, state_path: Path | None = None) -> None:
        self.name, self.cfg = strategy_config_from(config)
        self.half: DeviceHalf = get_strategy(self.name).device(device_id, spec, self.cfg, train_xy, seed)
        self.half.prepare()
        self.state_path = state_path
        if state_path is not None and state_path.exists():
            self.load(state_path)

    def handle(self, body: bytes) -> bytes | None:
        msg = decode_strategy(body)
        if msg.strategy != self.name or msg.device != self.half.device_id or msg.type == "supdate":
            raise ConfigError(f"a {msg.type} of {msg.strategy} for {msg.device} is not for this {self.name} device")
        if msg.type == "stask":
            out: bytes | None = encode_strategy(self.half.train(msg))
        else:
            self.half.apply(msg)
            out = None
        if self.state_path is not None:
            self.save(self.state_path)
        return out

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {f"model/{k}": v.detach().numpy().copy()
                                         for k, v in self.half.model.state_dict().items()}
        meta: dict[str, Any] = {"strategy": self.name, "json": {}, "lists": {}}
        for name, value in vars(self.half).items():
            if name in _CONSTRUCTOR_FIELDS or name in self.half.derived or _modules(value):
                continue  # layers prepare() rebuilt (ZeroFL's SWAT wrappers): their weights are the model's
            if isinstance(value, np.ndarray):
                arrays[f"field/{name}"] = value
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                meta["lists"][name] = len(value)
                arrays.update({f"field/{name}/{i}": v for i, v in enumerate(value)})
            else:
                meta["json"][name] = value  # a field that is neither arrays nor JSON fails json.dumps
        arrays.update({f"half/{k}": v for k, v in self.half.state_arrays().items()})  # FedMask's structure
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)  # a crash mid-write leaves the old state

    def load(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("strategy") != self.name:
                raise ConfigError(f"{path} holds {meta.get('strategy')!r} state, not {self.name!r}")
            state = {k[len("model/"):]: torch.from_numpy(z[k].copy()) for k in z.files if k.startswith("model/")}
            self.half.model.load_state_dict(state)
            for name in z.files:
                if name.startswith("field/") and name.count("/") == 1:
                    setattr(self.half, name[len("field/"):], z[name].copy())
            for name, n in meta["lists"].items():
                setattr(self.half, name, [z[f"field/{name}/{i}"].copy() for i in range(n)])
            self.half.load_state_arrays({k[len("half/"):]: z[k].copy() for k in z.files if k.startswith("half/")})
        for name, value in meta["json"].items():
            setattr(self.half, name, value)


def _modules(value: object) -> bool:
    return isinstance(value, torch.nn.Module) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, torch.nn.Module) for v in value))
