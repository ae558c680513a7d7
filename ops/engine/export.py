"""`fedmask export`: a saved device's mask and frozen weights -> a physically smaller dense model,
with the size, FLOPs and latency figures and a check that its predictions are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import FedMaskError
from shared.export import compact_model, export_report, save_compact


class NoDeviceState(FedMaskError):
    """The path holds no device state (for that device)."""


def pick_state(state: Path, device_id: str | None) -> Path:
    """`state` itself if it is a file; else the directory's state for `device_id` (default: the first)."""
    if state.is_file():
        return state
    files = sorted(state.glob("*.npz"))
    if device_id:
        files = [f for f in files if f.stem == device_id]
    if not files:
        raise NoDeviceState(f"no device state {'for ' + device_id + ' ' if device_id else ''}in {state}")
    return files[0]


def export_device(path: Path, *, repeats: int, out: Path | None = None) -> dict[str, Any]:
    """Load the device state at `path`, measure its compact model against the masked one, and
    write the compact model to `out` if given."""
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
    return report


def render_export(report: dict[str, Any]) -> str:
    """The text of `fedmask export`."""
    lines = [f"device {report['device']}: {report['dense_params']:,} -> {report['compact_params']:,} params "
             f"({1 / report['param_ratio']:.2f}x smaller), FLOPs {1 / report['flops_ratio']:.2f}x fewer"]
    for b in ("1", "64"):
        lines.append(f"  latency batch {b:>2}: dense {report[f'dense_latency_b{b}_ms']:.3f} ms, "
                     f"compact {report[f'compact_latency_b{b}_ms']:.3f} ms -> {report[f'speedup_b{b}']:.2f}x")
    lines.append(f"  predictions identical to the masked model: {report['predictions_identical']}")
    return "\n".join(lines)
