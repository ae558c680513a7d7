"""Shared CLI plumbing: progress bars, JSON output, building a run from flags."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ops.cli.progress import Progress
from shared.data import FederatedDataset, load_task
from shared.errors import FedMaskError
from shared.models import ModelSpec
from shared.presets import TaskPreset, preset


class Bar:
    """A progress bar fed by shared/'s progress callbacks (stderr, so --json on stdout stays clean);
    it animates only on a terminal (ops/cli/progress.py)."""

    def __init__(self, desc: str, total: int, enabled: bool = True) -> None:
        self.bar = Progress(total, desc, "round", stream=sys.stderr, enabled=enabled, leave=False)

    def __call__(self, done: int, total: int, info: dict[str, Any]) -> None:
        self.bar.set_postfix_str(", ".join(f"{k}={v:.3f}" for k, v in info.items() if k in ("accuracy", "uplink_mb")))
        self.bar.set_n(done)

    def close(self) -> None:
        self.bar.close()


def write_json(path: Path | None, payload: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


@dataclass(frozen=True)
class RunSetup:
    data: FederatedDataset
    spec: ModelSpec
    preset: TaskPreset


def build_run(task: str, devices: int | None, width: int | None, seed: int, arch: str | None = None,
              partition: str = "shards", alpha: float = 0.5, holdout: str | None = None) -> RunSetup:
    try:
        p = preset(task)
        opts: dict[str, Any] = dict(p.data_options)
        if holdout is not None:
            opts["holdout"] = holdout
        click.echo(f"loading {task} data (first run builds a cache under .data/) ...", err=True)
        data = load_task(task, num_devices=devices or p.devices, seed=seed, partition=partition,
                         alpha=alpha, **opts)
    except (FedMaskError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(data.summary(), err=True)
    spec = ModelSpec(arch or p.arch, data.input_shape, data.num_classes, width=width or p.width, seed=seed)
    return RunSetup(data, spec, p)
