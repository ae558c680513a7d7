"""The clock simulator's learner for small fleets: the project's own FedMask devices (DeviceRuntime,
torch), every task, update and merged mask through the real codec, as shared/sim/fedmask.py does.
Slow (one torch training per task), so for the 10- and 100-board cases. With an agreement variant's config
(FedMaskConfig.takes_agreement: sampled uploads, fedmask-agree) its devices take theta as the pipeline
sends it, q4 levels inside their structure (agreement_message), and blend it into their scores."""

from __future__ import annotations

import numpy as np

from shared import codec
from shared.bits import pack
from shared.data import FederatedDataset
from shared.device import DeviceRuntime, FedMaskConfig
from shared.merge_rules import MergeContext
from shared.models import ModelSpec, build_model
from shared.rounds import DeviceRecord, agreement_message, mask_message, receive_hello, unpack_update
from shared.structures import structure_rule
from shared.transport import Envelope


class TorchFedMask:
    def __init__(self, data: FederatedDataset, spec: ModelSpec, cfg: FedMaskConfig, seed: int) -> None:
        net = build_model(spec)
        self.fp, self.layout, self.nbits = net.fingerprint(), net.layout_hash(), net.nbits
        self.downlink = "q4" if cfg.takes_agreement else "bits"
        self.ctx = MergeContext(nbits=self.nbits, pruned_region=pack(net.region_of_last_layers(cfg.prune_last_k)))
        self.data = {d.device_id: d for d in data.devices}
        self.devices = {d.device_id: DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), seed)
                        for d in data.devices}
        self.records: dict[str, DeviceRecord] = {}
        rule = structure_rule(net, last_k=cfg.prune_last_k, rho=cfg.prune_rho)
        for d, dev in self.devices.items():  # enrolment: prune once, hello, the service's checks
            body = codec.encode(dev.hello())
            receive_hello(Envelope(f"uplink.{d}.hello", d, body), codec.decode(body, expect_type="hello"),
                          fingerprint=self.fp, layout=self.layout, rule=rule, records=self.records)

    def device_ids(self) -> list[str]:
        return sorted(self.devices)

    def structures(self) -> dict[str, np.ndarray]:
        return {d: r.structure for d, r in self.records.items()}

    def train(self, devices: list[str], tags: list[int]) -> list[np.ndarray]:
        out = []
        for d, tag in zip(devices, tags, strict=True):
            dev = self.devices[d]
            task = codec.make_task(device=d, round=tag, model=self.fp, layout=self.layout, bits=b"", nbits=0,
                                   version=dev.mask_version, deadline=0.0)
            update = dev.handle_task(codec.decode(codec.encode(task), expect_type="task"))
            msg = codec.decode(codec.encode(update), expect_type="update")
            out.append(unpack_update(msg, self.records[d], self.nbits))
        return out

    def apply(self, devices: list[str], masks: list[np.ndarray], versions: list[int]) -> None:
        build = agreement_message if self.downlink == "q4" else mask_message  # theta, or a packed full mask
        for d, m, v in zip(devices, masks, versions, strict=True):
            msg = build(d, m, self.records[d], round_id=v, fingerprint=self.fp, layout=self.layout, nbits=self.nbits)
            self.devices[d].handle_mask(codec.decode(codec.encode(msg), expect_type="mask"))

    def accuracy(self, split: str = "test", devices: list[str] | None = None) -> dict[str, float]:
        out = {}
        for d in devices if devices is not None else self.device_ids():
            s = getattr(self.data[d], split)
            out[d] = self.devices[d].evaluate(s.x, s.y)[1]
        return out
