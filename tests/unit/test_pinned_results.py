"""FedMask's results pinned bit for bit: the merged masks (and structures) of small seeded
simulations, recorded before the "make room" refactor. A move, split or rename that changes
what the engine computes fails here. The pipeline test asserts pipeline == simulator, so the
`pipeline` case pins the 3-round pipeline's masks too.

If a change is *meant* to alter results (a new default, a fixed rule), update the digest in the
same commit and say why there. Digests are of this machine's torch 2.13.0 CPU build."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from shared.data import FederatedDataset, load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.models import ModelSpec
from shared.presets import model_spec, preset
from shared.sim.fedmask import run_fedmask

# merge rule -> (sha256 over every device's mask bits and structure, uplink bytes, downlink bytes)
SIM_PINS = {
    "paper": ("58eb11dbea33b2d851e67d7320d7c4b23d0b70702558e5c7ebed7bf85ce67e22", 11071, 7716),
    "head": ("f90916779d4e40109a755b3344378a5499f8fdb921d5b6d51cb6ac5175a4b4fe", 11071, 7716),
    "body": ("668386c087979b4f3f5287fd9989fb3a9eefcac1084f5802b4d776e340afe761", 11071, 7716),
    "consensus": ("83ba7c119fbde8182c1a03e456b5a02c27d05cee551cec7aa9bb331304ad5d1e", 11071, 7716),
    "affinity": ("668386c087979b4f3f5287fd9989fb3a9eefcac1084f5802b4d776e340afe761", 11071, 7716),
}
# tests/integration/test_pipeline.py's configuration: digits, width 32, seed 0, 6 devices, 3 rounds, head.
# This one pin differs by CPU even with MKL's AVX2 branch (shared/__init__.py), which makes the five above
# agree everywhere seen: 2a3bb414... on machines without AVX-512 (an Intel one in November, an AMD EPYC on
# 2026-12-03), f2c3aa2b... on the AVX-512 machine of 2026-12-02. MKL's branch, ATen's CPU capability,
# oneDNN's ISA, numpy's SIMD features and OpenBLAS's core type were each ruled out as the cause; where
# it comes from is open (docs/roadmap.md). The expected digest is chosen by the CPU, so each still fails
# on a change of results. Byte counts are the same on both.
PIPELINE_PINS = {
    "no-avx512": ("2a3bb4149c4bd558b7c6d97a580d721f996635c3121f12475b2f5ac5bad95a2b", 13104, 11574),
    "avx512": ("f2c3aa2b3edd136df93fed117475a6bed10a6a7cf80333f3e9a9ab016f71e63a", 13104, 11574),
}


def _cpu_class() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no-avx512"
    return "avx512" if " avx512f" in flags else "no-avx512"


def _digest(save: Path, spec: ModelSpec, cfg: FedMaskConfig, seed: int) -> str:
    h = hashlib.sha256()
    for f in sorted(save.glob("*.npz")):
        dev = DeviceRuntime(f.stem, spec, cfg, (np.zeros(0), np.zeros(0)), seed=seed)
        dev.load(f)
        assert dev.structure is not None
        h.update(f.stem.encode())
        h.update(np.packbits(dev.model.mask_bits()).tobytes())
        h.update(dev.structure.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("merge", sorted(SIM_PINS))
def test_simulation_masks_are_pinned(merge: str, tmp_path: Path) -> None:
    data = load_task("digits", num_devices=8, seed=0)
    spec = ModelSpec("mlp", data.input_shape, data.num_classes, width=32)
    cfg = FedMaskConfig(train=preset("digits").mask_train, local_epochs=2)
    r = run_fedmask(data, spec, cfg, rounds=3, sample_rate=0.5, seed=3, merge=merge, save_dir=tmp_path)
    assert (_digest(tmp_path, spec, cfg, 3), r.uplink_bytes, r.downlink_bytes) == SIM_PINS[merge]


def test_pipeline_configuration_is_pinned(tmp_path: Path) -> None:
    task, width, seed = "digits", 32, 0
    data = load_task(task, num_devices=preset(task).devices, seed=seed)
    ids = {d.device_id for d in data.devices[:6]}
    subset = FederatedDataset(data.task, [d for d in data.devices if d.device_id in ids], data.num_classes,
                              data.input_shape, data.vocab_size)
    spec = model_spec(task, width=width, seed=seed)
    cfg = FedMaskConfig(train=preset(task).mask_train, local_epochs=preset(task).local_epochs)
    r = run_fedmask(subset, spec, cfg, rounds=3, sample_rate=1.0, seed=seed, merge="head", save_dir=tmp_path)
    assert (_digest(tmp_path, spec, cfg, seed), r.uplink_bytes, r.downlink_bytes) == PIPELINE_PINS[_cpu_class()]
