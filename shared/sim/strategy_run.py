"""Any strategy of shared/strategies/ in the simulator: the device and server halves exchange only
encoded messages (shared/strategy_codec.py), so every byte counted is a byte of the wire.

Per round: the sampled devices (without replacement, shared/rounds.sample_devices) each get a task
(with the model when their copy is stale), train and upload; the server folds the updates and its
downlinks (if any) are delivered. Evaluation of a global-model strategy: its final model on every
device's test (and validation) split, not counted as traffic, as shared/sim/baselines.py does.
A strategy whose devices never talk to a server (standalone: DeviceHalf.federated False) runs no
rounds: every device is built and trains in finish().
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from shared.data import DeviceData, FederatedDataset
from shared.models import ModelSpec
from shared.rounds import sample_count, sample_devices
from shared.sim.result import Progress, SimResult, mean_accuracy
from shared.strategies import get_strategy
from shared.strategies.base import DeviceHalf, ServerHalf, Strategy, StrategyConfig
from shared.strategy_codec import decode_strategy, encode_strategy


def run_strategy(name: str, cfg: StrategyConfig, data: FederatedDataset, spec: ModelSpec, *, rounds: int,
                 sample_rate: float, seed: int, eval_every: int = 0, progress: Progress | None = None,
                 save_dir: Path | None = None) -> SimResult:
    """save_dir: each device's state file (strategies that keep one: FedMask's, input to `fedmask export`)."""
    start = time.perf_counter()
    strategy = get_strategy(name)
    server = strategy.server(spec, cfg, seed=seed, rounds=rounds)
    by_id = {d.device_id: d for d in data.devices}
    devices: dict[str, DeviceHalf] = {}
    evaluator = strategy.device("evaluator", spec, cfg, (np.zeros((0,)), np.zeros((0,))), seed)
    evaluator.prepare()
    params = evaluator.model.nbits  # every trained weight (the dense model's masked tensors)
    up = down = updates = downloads = hello_bytes = 0
    flops = dense_flops = train_seconds = 0.0
    history = []
    federated = strategy.device.federated  # False (standalone): no rounds, every device trains in finish()
    if strategy.device.enrols or not federated:  # every device before round 1 (FedMask: prune, structure)
        for dd in data.devices:
            member = devices[dd.device_id] = _device(strategy, dd, spec, cfg, seed)
            hello = member.hello()
            if hello is None:  # an enrolling device has a hello; a standalone one sends nothing
                assert not strategy.device.enrols
                continue
            body = encode_strategy(hello)
            hello_bytes += len(body)
            server.enrol(decode_strategy(body, expect_type="shello"))
            train_seconds += member.last_stats.seconds if member.last_stats is not None else 0.0
    for r in range(1, (rounds if federated else 0) + 1):
        sampled = sample_devices(list(by_id), sample_count(len(by_id), rate=sample_rate), seed=seed, round_id=r)
        received = {}
        for d in sampled:
            dev = devices.get(d)
            if dev is None:
                dev = devices[d] = _device(strategy, by_id[d], spec, cfg, seed)
            body = encode_strategy(server.task(r, d))
            task = decode_strategy(body, expect_type="stask")
            down, downloads = down + len(body), downloads + bool(task.parts)
            body = encode_strategy(dev.train(task))
            up, updates = up + len(body), updates + 1
            msg = decode_strategy(body, expect_type="supdate")
            received[d] = msg
            flops += float(msg.stats.get("flops", 0.0))
            dense_flops += float(msg.stats.get("dense_flops", 0.0))
            train_seconds += float(msg.stats.get("train_seconds", 0.0))
        for d, out in server.fold(r, received).items():
            body = encode_strategy(out)
            down, downloads = down + len(body), downloads + 1
            devices[d].apply(decode_strategy(body, expect_type="smodel"))
        point = {"round": r, "uplink_mb": up / 1e6, "downlink_mb": down / 1e6}
        if eval_every and (r % eval_every == 0 or r == rounds):
            point["accuracy"] = mean_accuracy(_scores(server, evaluator, devices, data, "test"))
        history.append(point)
        if progress:
            progress(r, rounds, point)
    for dev in devices.values():
        before = dev.last_stats
        dev.finish()
        if dev.last_stats is not before and dev.last_stats is not None:  # it trained (a fine-tune, standalone)
            train_seconds += dev.last_stats.seconds
    test_acc = _scores(server, evaluator, devices, data, "test")
    val_acc = _scores(server, evaluator, devices, data, "val")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for d, dev in devices.items():
            dev.save(save_dir / f"{d}.npz")
    extra: dict[str, object] = {
        "strategy": name, "updates": updates, "downloads": downloads, "hello_bytes": hello_bytes,
        "downlink_bits_per_param": 8 * down / (params * downloads) if downloads else 0.0,
        "train_flops": flops, "dense_train_flops": dense_flops,
        "flops_ratio": flops / dense_flops if dense_flops else float("nan"),
    }
    other = getattr(evaluator, "evaluate_dense", None)  # ZeroFL: the dense weights, next to its top-K forward
    if other is not None and server.global_model:
        extra["dense_eval_accuracy"] = mean_accuracy({d: other(v.test.x, v.test.y) for d, v in by_id.items()})
    if hasattr(server, "readjust_rounds"):  # FedDST: when masks were readjusted, how far the global one moved
        extra["readjust_rounds"] = list(server.readjust_rounds)
        extra["mask_moves"] = list(getattr(server, "mask_moves", []))
    # Bits per update; a strategy that sends nothing by design (standalone) spends 0, as the baseline counts it.
    up_bits = 8 * up / (params * updates) if updates else (float("nan") if federated else 0.0)
    return SimResult(
        method=name, task=data.task, devices=len(by_id), rounds=rounds,
        personalized_accuracy=mean_accuracy(test_acc), per_device_accuracy=test_acc,
        uplink_bytes=up + hello_bytes, downlink_bytes=down,
        uplink_bits_per_param=up_bits,
        train_seconds=train_seconds, wall_seconds=time.perf_counter() - start, params=params,
        validation_accuracy=mean_accuracy(val_acc), history=history, extra=extra)


def _scores(server: ServerHalf, evaluator: DeviceHalf, devices: dict[str, DeviceHalf], data: FederatedDataset,
            split: str) -> dict[str, float]:
    """Mean-per-device accuracy: of the global model (loaded into `evaluator` once), or, for a
    personalised strategy, of each device's own state with the server's current message for it (a
    device never sampled starts from the initial model)."""
    if server.global_model:
        evaluator.apply(decode_strategy(encode_strategy(server.model_message("evaluator")), expect_type="smodel"))
    out = {}
    for dd in data.devices:
        s = getattr(dd, split)
        who = evaluator
        if not server.global_model:
            who = devices.get(dd.device_id) or _fresh(devices, dd.device_id, evaluator, dd.train.x, dd.train.y)
            who.apply(decode_strategy(encode_strategy(server.model_message(dd.device_id)), expect_type="smodel"))
        out[dd.device_id] = who.evaluate(s.x, s.y)[1]
    return out


def _device(strategy: Strategy, dd: DeviceData, spec: ModelSpec, cfg: StrategyConfig, seed: int) -> DeviceHalf:
    dev = strategy.device(dd.device_id, spec, cfg, (dd.train.x, dd.train.y), seed, val_xy=(dd.val.x, dd.val.y))
    dev.prepare()
    return dev


def _fresh(devices: dict[str, DeviceHalf], device_id: str, like: DeviceHalf, x: np.ndarray,
           y: np.ndarray) -> DeviceHalf:
    dev = devices[device_id] = type(like)(device_id, like.spec, like.cfg, (x, y), like.seed)
    dev.prepare()
    return dev
