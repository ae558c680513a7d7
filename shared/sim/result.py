"""What a simulation run reports (the JSON schema of `fedmask simulate --json-out`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# progress(round_done, rounds_total, info) -- the CLI draws a bar; shared/ stays UI-free.
Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass
class SimResult:
    method: str
    task: str
    devices: int
    rounds: int
    personalized_accuracy: float
    per_device_accuracy: dict[str, float]
    uplink_bytes: int
    downlink_bytes: int
    uplink_bits_per_param: float
    train_seconds: float
    wall_seconds: float
    params: int                      # parameters the method trains or masks
    merge: str | None = None
    validation_accuracy: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)  # per round: cumulative MB, mean acc
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = clean_json(asdict(self))
        return cleaned


def mean_accuracy(accs: dict[str, float]) -> float:
    vals = [v for v in accs.values() if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def clean_json(obj: Any) -> Any:
    """JSON has no NaN: write null, so strict parsers (jq, JS) read the file."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    return obj
