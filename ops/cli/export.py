"""`fedmask export`: a device's mask + frozen weights -> a physically smaller dense model."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ops.cli.common import write_json
from shared.device import DeviceRuntime, FedMaskConfig
from shared.export import compact_model, export_report, save_compact


@click.command()
@click.argument("state", type=click.Path(exists=True, path_type=Path))
@click.option("--device", "device_id", default=None, help="with a directory: which device (default: the first)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the compact model (.npz)")
@click.option("--repeats", type=int, default=200, show_default=True, help="latency samples per model")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def export(state: Path, device_id: str | None, out: Path | None, repeats: int, json_out: Path | None,
           as_json: bool) -> None:
    """Export the compact model of the device state STATE (a .npz, or a directory from --save-devices)."""
    path = _pick(state, device_id)
    spec = DeviceRuntime.read_spec(path)
    dev = DeviceRuntime(path.stem, spec, FedMaskConfig(), (np.zeros((0,)), np.zeros((0,))), seed=spec.seed)
    dev.load(path)
    # Inputs for the prediction check and timing: standard-normal samples of the model's input shape
    # (features are standardised), or character ids for the LSTM.
    rng = np.random.Generator(np.random.PCG64(0))
    if spec.arch == "char_lstm":
        x = rng.integers(0, spec.num_classes, size=(256, *spec.input_shape)).astype(np.int64)
    else:
        x = rng.standard_normal((256, *spec.input_shape)).astype(np.float32)
    report = export_report(dev.model, x, repeats=repeats)
    report["device"] = path.stem
    if out is not None:
        save_compact(compact_model(dev.model), out)
        report["compact_path"] = str(out)
    write_json(json_out, report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"device {path.stem}: {report['dense_params']:,} -> {report['compact_params']:,} params "
               f"({1 / report['param_ratio']:.2f}x smaller), FLOPs {1 / report['flops_ratio']:.2f}x fewer")
    for b in ("1", "64"):
        click.echo(f"  latency batch {b:>2}: dense {report[f'dense_latency_b{b}_ms']:.3f} ms, "
                   f"compact {report[f'compact_latency_b{b}_ms']:.3f} ms -> {report[f'speedup_b{b}']:.2f}x")
    click.echo(f"  predictions identical to the masked model: {report['predictions_identical']}")


def _pick(state: Path, device_id: str | None) -> Path:
    if state.is_file():
        return state
    files = sorted(state.glob("*.npz"))
    if device_id:
        files = [f for f in files if f.stem == device_id]
    if not files:
        raise click.ClickException(f"no device state {'for ' + device_id + ' ' if device_id else ''}in {state}")
    return files[0]
