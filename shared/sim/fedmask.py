"""FedMask over the in-memory transport: DeviceRuntime on one side, round logic on the other,
every message encoded and decoded by the real codec (so byte counts are the wire's)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared import codec
from shared.bits import pack, scatter_at
from shared.data import DeviceData, FederatedDataset
from shared.device import DeviceRuntime, FedMaskConfig, derive_seed
from shared.merge_rules import MergeContext, MergeRule, get_rule
from shared.models import ModelSpec, build_model
from shared.rounds import (
    DeviceRecord,
    RoundState,
    agreement_broadcast,
    delta_downlink,
    downlink_messages,
    receive_hello,
    receive_update,
    sample_count,
    sample_devices,
)
from shared.sim.byzantine import Adversary
from shared.sim.result import Progress, SimResult, mean_accuracy
from shared.structures import structure_rule
from shared.train import local_train
from shared.transport import InMemoryTransport


def run_fedmask(data: FederatedDataset, spec: ModelSpec, cfg: FedMaskConfig, *, rounds: int,
                sample_rate: float, seed: int, merge: str = "paper", final_local_epochs: int = 0,
                eval_every: int = 0, progress: Progress | None = None,
                save_dir: Path | None = None, broadcast_final: bool = False,
                adversary: Adversary | None = None) -> SimResult:
    """Run FedMask for `rounds` rounds. With final_local_epochs > 0 every device adapts its last
    mask locally before evaluation, exactly as FedAvg-FT fine-tunes the global model.

    broadcast_final (agreement rule only): after the last round, the devices that did not take
    part in it also receive its agreement, so with share 1 every device holds the one global model
    FedPM evaluates (bytes counted in downlink_bytes and extra["final_broadcast_bytes"]).

    adversary: its devices send poisoned updates (shared/sim/byzantine.py); extra then names them."""
    start = time.perf_counter()
    rule = get_rule(merge)
    net = build_model(spec)
    fp, layout, nbits = net.fingerprint(), net.layout_hash(), net.nbits
    layer_sizes = [int(np.prod(shape)) for _, shape in net.layout()]
    # What the aggregator holds to decode delta-coded updates: each device's newest merged mask (packed
    # full, by version), and version 0, the initial mask every party derives from the model seed.
    initial = pack(net.mask_bits())
    merged: dict[str, tuple[int, np.ndarray]] = {}
    ctx = MergeContext(nbits=nbits, pruned_region=pack(net.region_of_last_layers(cfg.prune_last_k)))
    bus = InMemoryTransport()
    # Devices see their validation split only when they choose a share on it (fedmask-adapt): otherwise
    # their updates would carry its accuracy, and every other variant's bytes would change.
    devices = {d.device_id: DeviceRuntime(d.device_id, spec, cfg, (d.train.x, d.train.y), seed,
                                          val_xy=(d.val.x, d.val.y) if cfg.share_grid else None)
               for d in data.devices}
    by_id = {d.device_id: d for d in data.devices}
    train_seconds = 0.0

    # Enrolment: every device prunes once and says hello with its structure.
    for dev in devices.values():
        bus.publish_uplink(dev.device_id, "hello", codec.encode(dev.hello()))
        train_seconds += _seconds(dev)
    records: dict[str, DeviceRecord] = {}
    structures = structure_rule(net, last_k=cfg.prune_last_k, rho=cfg.prune_rho)
    for env in bus.take_uplink():
        receive_hello(env, codec.decode(env.body, expect_type="hello"), fingerprint=fp, layout=layout,
                      rule=structures, records=records)
    hello_bytes = bus.up.bytes

    update_bytes, updates, payload_bits, history = 0, 0, 0, []
    mask_bytes, masks, delta_updates, delta_masks = 0, 0, 0, 0
    raw_update_bytes, raw_mask_bytes = 0, 0  # what the same messages cost raw: both codings in one run
    pre_merge: dict[str, float] = {}
    for r in range(1, rounds + 1):
        sampled = sample_devices(list(devices), sample_count(len(devices), rate=sample_rate), seed=seed, round_id=r)
        rnd = RoundState(round_id=r, sampled=sampled, deadline=float("inf"), quorum=len(sampled))
        for d in sampled:
            task = codec.make_task(device=d, round=r, model=fp, layout=layout, bits=b"", nbits=0,
                                   version=records[d].version, deadline=0.0)
            bus.publish_downlink(d, codec.encode(task))
        for d in sampled:
            for body in bus.take_downlink(d):
                update = devices[d].handle_task(codec.decode(body, expect_type="task"))
                if adversary is not None:
                    update = adversary.poison(update)
                train_seconds += _seconds(devices[d])
                body_up = codec.encode(update)
                update_bytes += len(body_up)
                payload_bits += 8 * len(update.bits or b"")
                updates += 1
                delta_updates += update.enc == "delta"
                raw_update_bytes += _raw_size(update, devices[d])
                bus.publish_uplink(d, "update", body_up)
            pre_merge[d] = devices[d].evaluate(by_id[d].test.x, by_id[d].test.y)[1]
        for env in bus.take_uplink():
            msg = codec.decode(env.body, expect_type="update")
            receive_update(env, msg, fingerprint=fp, layout=layout, nbits=nbits, rnd=rnd, records=records,
                           held=_held(merged.get(msg.device), initial))
        rnd.state = "closing"
        for d, msg in downlink_messages(rule, ctx, rnd, records, fingerprint=fp, layout=layout).items():
            records[d].version = msg.version or 0
            if msg.enc == "structure" and msg.bits is not None:
                merged[d] = (records[d].version, scatter_at(np.frombuffer(msg.bits, np.uint8), records[d].where(nbits),
                                                            nbits))
            wire = delta_downlink(msg, rnd, records[d], nbits=nbits, layer_sizes=layer_sizes)
            body_down = codec.encode(wire)
            mask_bytes, masks, delta_masks = mask_bytes + len(body_down), masks + 1, delta_masks + (wire.enc == "delta")
            raw_mask_bytes += codec.message_size(msg)
            bus.publish_downlink(d, body_down)
        rnd.state = "closed"
        for d in sampled:
            for body in bus.take_downlink(d):
                devices[d].handle_mask(codec.decode(body, expect_type="mask"))
        point = {"round": r, "uplink_mb": bus.up.bytes / 1e6, "downlink_mb": bus.down.bytes / 1e6}
        if eval_every and (r % eval_every == 0 or r == rounds):
            point["accuracy"] = mean_accuracy(_accuracies(devices, by_id, "test"))
        history.append(point)
        if progress:
            progress(r, rounds, point)

    broadcast_bytes = bus.down.bytes
    if broadcast_final and rounds:
        _broadcast_agreement(rule, ctx, rnd, records, devices, bus, fingerprint=fp, layout=layout)
    broadcast_bytes = bus.down.bytes - broadcast_bytes
    before_final_acc = _accuracies(devices, by_id, "test")
    before_final = mean_accuracy(before_final_acc)
    if final_local_epochs:
        for d, dev in devices.items():
            st = local_train(dev.model, dev.x, dev.y, final_local_epochs, cfg.train, seed=derive_seed(seed, "final", d))
            train_seconds += st.seconds
    test_acc = _accuracies(devices, by_id, "test")
    attacked = {} if adversary is None else {"byzantine": sorted(adversary.devices), "attack": adversary.attack}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for d, dev in devices.items():
            dev.save(save_dir / f"{d}.npz")
    return SimResult(
        method="fedmask", task=data.task, devices=len(devices), rounds=rounds,
        personalized_accuracy=mean_accuracy(test_acc), per_device_accuracy=test_acc,
        uplink_bytes=bus.up.bytes, downlink_bytes=bus.down.bytes,
        uplink_bits_per_param=8 * update_bytes / (nbits * updates) if updates else float("nan"),
        train_seconds=train_seconds, wall_seconds=time.perf_counter() - start, params=nbits, merge=merge,
        validation_accuracy=mean_accuracy(_accuracies(devices, by_id, "val")), history=history,
        extra={"hello_bytes": hello_bytes, "updates": updates, "update_bytes": update_bytes,
               "uplink_payload_bits_per_param": payload_bits / (nbits * updates) if updates else float("nan"),
               "coding": cfg.coding, "delta_updates": delta_updates, "masks": masks, "delta_masks": delta_masks,
               "downlink_bits_per_param": 8 * mask_bytes / (nbits * masks) if masks else float("nan"),
               "raw_uplink_bits_per_param": 8 * raw_update_bytes / (nbits * updates) if updates else float("nan"),
               "raw_downlink_bits_per_param": 8 * raw_mask_bytes / (nbits * masks) if masks else float("nan"),
               "structure_density": float(np.mean([r.inside / nbits for r in records.values()])),
               "pre_merge_accuracy": mean_accuracy(pre_merge),
               "final_local_epochs": final_local_epochs, "accuracy_before_final_adaptation": before_final,
               "per_device_accuracy_before_final": before_final_acc,
               "chosen_shares": {d: dev.chosen_shares for d, dev in devices.items() if dev.chosen_shares},
               "model_fingerprint": fp, "final_broadcast_bytes": broadcast_bytes, **attacked},
    )


def _broadcast_agreement(rule: MergeRule, ctx: MergeContext, rnd: RoundState, records: dict[str, DeviceRecord],
                         devices: dict[str, DeviceRuntime], bus: InMemoryTransport, *, fingerprint: str,
                         layout: str) -> None:
    """The closed round's agreement, over the real codec, to every device that did not receive it."""
    for d, msg in agreement_broadcast(rule, ctx, rnd, records, fingerprint=fingerprint, layout=layout).items():
        records[d].version = rnd.round_id
        bus.publish_downlink(d, codec.encode(msg))
        for body in bus.take_downlink(d):
            devices[d].handle_mask(codec.decode(body, expect_type="mask"))


def _raw_size(update: codec.Message, dev: DeviceRuntime) -> int:
    """The size `update` would have had coded raw (what a coding="raw" device sends)."""
    if update.enc != "delta" or dev.sent is None:
        return codec.message_size(replace(update, downlink=None))
    bits = dev.sent[1]
    return codec.message_size(replace(update, enc="structure", bits=bits, crc32=zlib.crc32(bits), base=None,
                                      mask_crc32=None, downlink=None))


def _held(newest: tuple[int, np.ndarray] | None, initial: np.ndarray) -> Callable[[int], np.ndarray | None]:
    """The simulator's copy of the aggregator's lookup: version 0 is the initial mask, else the newest."""
    def held(version: int) -> np.ndarray | None:
        if version == 0:
            return initial
        return newest[1] if newest is not None and newest[0] == version else None
    return held


def _accuracies(devices: dict[str, DeviceRuntime], by_id: dict[str, DeviceData], split: str) -> dict[str, float]:
    out = {}
    for d, dev in devices.items():
        s = getattr(by_id[d], split)
        out[d] = dev.evaluate(s.x, s.y)[1]
    return out


def _seconds(dev: DeviceRuntime) -> float:
    return dev.last_stats.seconds if dev.last_stats is not None else 0.0
