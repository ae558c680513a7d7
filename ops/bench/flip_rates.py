"""How much masks change between rounds: the measurement behind delta coding (docs/results.md).

`python -m ops.bench.flip_rates --task mnist --rounds 10 --seed 0` runs the simulator with the task's
preset (raw coding: what is measured is the masks, not the wire) and records, inside each device's
structure, the fraction of bits that differ
  - uplink: between the merged mask the device last applied (the initial mask before its first) and the
    update it sends;
  - downlink: between consecutive merged masks of a device, and between a merged mask and the device's
    own update that went into it,
overall and per layer, with the entropy each would cost at one probability per layer (bits per masked
parameter, headers excluded). It wraps DeviceRuntime in the simulator's module for the run's length:
a measuring tool, not a code path of the product.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import shared.sim.fedmask as sim_fedmask
from shared import codec
from shared.bits import unpack
from shared.data import load_task
from shared.device import DeviceRuntime, FedMaskConfig
from shared.models import ModelSpec
from shared.presets import preset


@dataclass
class Tally:
    """Bits and flips per layer over many messages, and the per-layer entropy they would cost."""

    layers: int
    bits: np.ndarray = field(init=False)
    flips: np.ndarray = field(init=False)
    entropy_bits: float = 0.0
    messages: int = 0

    def __post_init__(self) -> None:
        self.bits, self.flips = np.zeros(self.layers), np.zeros(self.layers)

    def add(self, base: np.ndarray, new: np.ndarray, layer: np.ndarray) -> None:
        changed = base ^ new
        self.messages += 1
        for i in range(self.layers):
            sel = layer == i
            n, k = int(sel.sum()), int(changed[sel].sum())
            self.bits[i] += n
            self.flips[i] += k
            self.entropy_bits += n * _entropy(k / n) if n else 0.0

    def report(self, names: list[str], nbits: int) -> dict[str, Any]:
        rate = float(self.flips.sum() / max(self.bits.sum(), 1))
        return {"messages": self.messages, "flip_rate": round(rate, 5),
                "per_layer": {names[i]: round(float(self.flips[i] / max(self.bits[i], 1)), 5)
                              for i in range(self.layers)},
                "entropy_bits_per_param": round(self.entropy_bits / (max(self.messages, 1) * nbits), 5)}


def _entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


@contextmanager
def recording(tallies: dict[str, Tally], bounds: np.ndarray) -> Iterator[None]:
    """The simulator's devices, recording what they send and apply (see the module docstring)."""

    class Recording(DeviceRuntime):
        merged: np.ndarray | None = None
        own: np.ndarray | None = None

        def _inside(self) -> tuple[np.ndarray, np.ndarray]:
            assert self.structure is not None
            where = np.flatnonzero(unpack(self.structure, self.nbits))
            return where, np.searchsorted(bounds, where, side="right") - 1

        def handle_task(self, task: codec.Message) -> codec.Message:
            msg = super().handle_task(task)
            where, layer = self._inside()
            self.own = msg.unpack()
            first = self.merged is None
            base = self._initial_bits(where) if self.merged is None else self.merged
            tallies["uplink_first" if first else "uplink_later"].add(base, self.own, layer)
            tallies["uplink"].add(base, self.own, layer)
            return msg

        def handle_mask(self, msg: codec.Message) -> None:
            super().handle_mask(msg)
            where, layer = self._inside()
            new = msg.unpack()
            prev = self._initial_bits(where) if self.merged is None else self.merged
            tallies["downlink_vs_previous_merged"].add(prev, new, layer)
            if self.own is not None:
                tallies["downlink_vs_own_update"].add(self.own, new, layer)
            self.merged = new

        def _initial_bits(self, where: np.ndarray) -> np.ndarray:
            return np.unpackbits(self._initial, count=self.nbits).astype(bool)[where]

    original = sim_fedmask.DeviceRuntime
    sim_fedmask.DeviceRuntime = Recording  # type: ignore[misc]
    try:
        yield
    finally:
        sim_fedmask.DeviceRuntime = original  # type: ignore[misc]


def measure(task: str, rounds: int, seed: int) -> dict[str, Any]:
    p = preset(task)
    data = load_task(task, num_devices=p.devices, seed=seed, **p.data_options)  # type: ignore[arg-type]
    spec = ModelSpec(p.arch, data.input_shape, data.num_classes, width=p.width, seed=seed)
    net = sim_fedmask.build_model(spec)
    names = [n for n, _ in net.layout()]
    bounds = np.cumsum([0] + [int(np.prod(s)) for _, s in net.layout()])
    kinds = ("uplink", "uplink_first", "uplink_later", "downlink_vs_previous_merged", "downlink_vs_own_update")
    tallies = {k: Tally(len(names)) for k in kinds}
    with recording(tallies, bounds):
        result = sim_fedmask.run_fedmask(data, spec, FedMaskConfig(train=p.mask_train, local_epochs=p.local_epochs),
                                         rounds=rounds, sample_rate=p.sample_rate, seed=seed, merge=p.merge)
    return {"task": task, "rounds": rounds, "seed": seed, "merge": p.merge, "params": net.nbits,
            "personalized_accuracy": result.personalized_accuracy,
            **{k: t.report(names, net.nbits) for k, t in tallies.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(measure(args.task, args.rounds, args.seed), indent=2))


if __name__ == "__main__":
    main()
