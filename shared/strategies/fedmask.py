"""FedMask (Li et al., SenSys 2021) as a strategy: the same DeviceRuntime and round logic
(shared/device.py, shared/rounds.py) the simulator's run_fedmask and the pipeline run, behind the
strategy interface. Same seeds, same masks: tests/unit/test_fedmask_strategy.py checks it against the
pinned simulations of tests/unit/test_pinned_results.py, bit for bit.

Wire (shared/strategy_codec.py; the bytes differ from FedMask's own codec, shared/codec.py, by the
envelope only: the payloads are the same packed bits):
  shello   up, once: the pruned structure S_i, a "structure" bits part over all the model's bits;
           `model` is the frozen weights' fingerprint (it hashes names, shapes and values, so it
           covers the layout too)
  stask    down: no parts (every device keeps its own mask; nothing global travels in a task)
  supdate  up: the mask bits inside S_i ("mask", bits), one Bernoulli draw of them for the
           agreement family
  smodel   down, per participant: the merged bits inside S_i ("mask", bits), or the agreement as
           4-bit levels inside S_i ("agreement", bits: 4 per element); `round` is its version

Not here (FedMask's own path keeps them): delta coding, late carry and the asynchronous buffer, the
Byzantine hook. FedMask's training is not FLOP-counted (its updates report 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from shared import codec
from shared.bits import pack, popcount, scatter_spans
from shared.device import DeviceRuntime, FedMaskConfig, derive_seed
from shared.errors import CodecError
from shared.merge_rules import MergeContext, get_rule
from shared.models import build_model
from shared.payloads import Part
from shared.rounds import DeviceRecord, RoundState, agreement_broadcast, check_hello, downlink_messages
from shared.strategies.base import DeviceHalf, ServerHalf, StrategyConfig
from shared.strategy_codec import StrategyMessage
from shared.structures import structure_rule
from shared.train import local_train

NAME = "fedmask"


def fedmask_config(cfg: StrategyConfig) -> FedMaskConfig:
    """The device config the strategy runs: cfg.fedmask, or FedMask's defaults with cfg's training."""
    fm = cfg.fedmask if cfg.fedmask is not None else FedMaskConfig(train=cfg.train, local_epochs=cfg.local_epochs)
    if fm.coding != "raw":
        raise ValueError("the fedmask strategy sends raw structure bits; delta coding runs in FedMask's own "
                         "path (fedmask simulate --coding delta, the aggregator without --strategy)")
    return fm


def _bits(name: str, data: bytes, n: int) -> Part:
    """Packed bits as they are (np.packbits' order, zero padding: what shared.bits.pack produces)."""
    return Part(name=name, enc="bits", n=n, values=bytes(data))


class FedMaskDevice(DeviceHalf):
    name = NAME
    enrols = True
    derived: ClassVar[frozenset[str]] = frozenset({"runtime"})  # kept by state_arrays()
    runtime: DeviceRuntime  # set by prepare(): FedMask's own device, which does all the work

    def prepare(self) -> None:
        if self._model is None:
            fm = fedmask_config(self.cfg)
            # Only a device that chooses its share reads its validation split (as run_fedmask does).
            val = self.val_xy if fm.share_grid else None
            self.runtime = DeviceRuntime(self.device_id, self.spec, fm, (self.x, self.y), self.seed, val_xy=val)
            self._model = self.runtime.model

    def hello(self) -> StrategyMessage:
        """Prune once (DeviceRuntime.hello) and announce the structure."""
        rt = self.runtime
        rt.hello()
        self.last_stats = rt.last_stats
        assert rt.structure is not None  # hello() pruned
        return StrategyMessage(type="shello", strategy=NAME, device=self.device_id, round=0, model=rt.fingerprint,
                               parts=(_bits("structure", rt.structure.tobytes(), rt.nbits),))

    def train(self, task: StrategyMessage) -> StrategyMessage:
        rt = self.runtime
        if task.model != rt.fingerprint:
            raise CodecError("wrong_model", f"task for model {task.model}, device has {rt.fingerprint}")
        inner = codec.make_task(device=self.device_id, round=task.round, model=rt.fingerprint, layout=rt.layout,
                                bits=b"", nbits=0, version=rt.mask_version, deadline=0.0)
        update = rt.handle_task(inner)
        assert update.bits is not None and update.nbits is not None and rt.last_stats is not None
        self.last_stats = rt.last_stats
        return self.update(task, [_bits("mask", update.bits, update.nbits)], rt.last_stats, 0.0, 0.0)

    def apply(self, msg: StrategyMessage) -> None:
        """A merged mask or an agreement (DeviceRuntime.handle_mask); an empty smodel changes nothing."""
        rt = self.runtime
        if not msg.parts:
            return
        if msg.model != rt.fingerprint or rt.structure is None:
            raise CodecError("wrong_model", f"mask for model {msg.model}, device has {rt.fingerprint}")
        inside = popcount(rt.structure)
        enc: codec.Encoding = "q4" if msg.has("agreement") else "structure"
        part, n = (msg.part("agreement"), 4 * inside) if enc == "q4" else (msg.part("mask"), inside)
        if part.enc != "bits" or part.n != n:
            raise CodecError("bad_length", f"{part.name}: {part.n} bits for a structure of {inside}")
        rt.handle_mask(codec.make_mask(device=self.device_id, round=msg.round, model=rt.fingerprint, layout=rt.layout,
                                       bits=part.values, nbits=n, version=msg.round, enc=enc))

    def finish(self) -> None:
        """Local adaptation before evaluation, as run_fedmask's final_local_epochs (same seeds)."""
        if self.cfg.final_local_epochs:
            rt = self.runtime
            st = local_train(rt.model, rt.x, rt.y, self.cfg.final_local_epochs, rt.cfg.train,
                             seed=derive_seed(self.seed, "final", self.device_id))
            self.last_stats = st

    def save(self, path: Path) -> None:
        self.runtime.save(path)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The runtime's state beyond the model (raw coding: no delta bases): the structure, so a
        restarted board's hello is the same, the mask version and the shares it chose."""
        rt = self.runtime
        out = {"mask_version": np.array([rt.mask_version], np.int64),
               "chosen_shares": np.array(rt.chosen_shares, np.float64)}
        if rt.structure is not None:
            out["structure"] = rt.structure
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        rt = self.runtime
        rt.structure = arrays["structure"].copy() if "structure" in arrays else None
        rt.mask_version = int(arrays["mask_version"][0])
        rt.chosen_shares = [float(v) for v in arrays["chosen_shares"]]


class FedMaskServer(ServerHalf):
    name = NAME
    global_model = False  # every device keeps its own mask: each is evaluated with its own state
    derived: ClassVar[frozenset[str]] = frozenset({"fingerprint", "layout", "nbits", "rule", "ctx", "structures",
                                                   "records"})
    enrolled_structures = True  # records come from the aggregator's per-device structures (adopt)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        fm = fedmask_config(self.cfg)
        net = build_model(self.spec)
        self.fingerprint, self.layout, self.nbits = net.fingerprint(), net.layout_hash(), net.nbits
        self.rule = get_rule(self.cfg.merge)
        self.ctx = MergeContext(nbits=self.nbits, pruned_region=pack(net.region_of_last_layers(fm.prune_last_k)))
        self.structures = structure_rule(net, last_k=fm.prune_last_k, rho=fm.prune_rho)
        self.records: dict[str, DeviceRecord] = {}
        if self.cfg.broadcast_final and getattr(self.rule, "downlink", "bits") != "q4":
            raise ValueError(f"broadcast_final needs the agreement rule, not {self.cfg.merge!r}")
        self.version = self.fingerprint

    def _parts(self) -> list[Part]:
        return []  # nothing global: a task carries no model, and evaluation uses each device's own mask

    def hello_model(self) -> str:
        return self.fingerprint

    def adopt(self, device: str, structure: bytes) -> None:
        """An enrolled device's structure (checked by enrol() when it said hello). Its record's version
        only serves delta coding, which this strategy refuses, so a fresh record folds the same."""
        if device not in self.records:
            self.records[device] = DeviceRecord(structure=np.frombuffer(structure, np.uint8).copy())

    def enrol(self, hello: StrategyMessage) -> None:
        """check_hello's checks (all the model's bits, one structure per device, one pruning can make)."""
        if hello.model != self.fingerprint:
            raise CodecError("wrong_model", f"{hello.device}'s model {hello.model} != {self.fingerprint}")
        part = hello.part("structure")
        if part.enc != "bits":
            raise CodecError("bad_value", f"structure is {part.enc}, not bits")
        msg = codec.make_hello(device=hello.device, round=0, model=self.fingerprint, layout=self.layout,
                               structure=part.values, nbits=part.n)
        known = self.records.get(hello.device)
        structure = check_hello(msg, self.structures, None if known is None else known.structure.tobytes())
        if known is None:
            self.records[hello.device] = DeviceRecord(structure=structure)

    def fold(self, round_id: int, updates: Mapping[str, StrategyMessage]) -> dict[str, StrategyMessage]:
        """Merge where structures overlap (the configured rule) and send each participant its own mask;
        with broadcast_final, the last round's agreement also reaches every other device."""
        rnd = RoundState(round_id=round_id, sampled=sorted(updates), deadline=float("inf"), quorum=len(updates))
        for d in sorted(updates):
            rec = self.records.get(d)
            if rec is None:
                raise CodecError("unknown_device", f"{d} has not sent a hello")
            part = updates[d].part("mask")
            if updates[d].model != self.fingerprint:
                raise CodecError("wrong_model", f"{d}'s update is for model {updates[d].model}")
            if part.enc != "bits" or part.n != rec.inside:
                raise CodecError("bad_length", f"expected {rec.inside} structure bits from {d}, got {part.n}")
            rnd.received[d] = scatter_spans(np.frombuffer(part.values, np.uint8), rec.spans(self.nbits))
        rnd.state = "closing"
        kw = {"fingerprint": self.fingerprint, "layout": self.layout}
        out = downlink_messages(self.rule, self.ctx, rnd, self.records, **kw)
        if self.cfg.broadcast_final and round_id == self.rounds:
            out |= agreement_broadcast(self.rule, self.ctx, rnd, self.records, **kw)
        for d, m in out.items():
            self.records[d].version = m.version or 0
        self.closed_round = round_id
        return {d: self._smodel(m) for d, m in out.items()}

    def _smodel(self, m: codec.Message) -> StrategyMessage:
        assert m.bits is not None and m.nbits is not None
        name = "agreement" if m.enc == "q4" else "mask"
        return StrategyMessage(type="smodel", strategy=NAME, device=m.device, round=m.version or 0,
                               model=self.fingerprint, parts=(_bits(name, m.bits, m.nbits),))

    def model_message(self, device: str) -> StrategyMessage:
        """Nothing: a FedMask device is evaluated with the mask it holds, which the server never overrides."""
        return StrategyMessage(type="smodel", strategy=NAME, device=device, round=0, model=self.fingerprint)
