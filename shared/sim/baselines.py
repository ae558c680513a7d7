"""Baselines on the same data, splits and architecture (dense mode: W trained, no mask).

Bytes are counted as the payload a real system would send: 4 bytes per float32 parameter for
dense models; 8 bytes per kept element (float32 value + int32 index) for Top-k uplinks; plus
the same per-message header the codec adds to a FedMask message, so comparisons are fair.

Each is a strategy too (shared/strategies/: fedavg, fedavg-ft, standalone, topk), equal to the path
here device for device; Top-k's sparsification and Standalone's budget are those modules' functions.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from shared.data import FederatedDataset
from shared.device import derive_seed
from shared.models import MaskedNet, ModelSpec, build_model
from shared.rounds import sample_count, sample_devices
from shared.sim.result import Progress, SimResult, mean_accuracy
from shared.strategies.standalone import standalone_epochs
from shared.strategies.topk import sparsify, topk_count
from shared.train import TrainConfig, evaluate, local_train

HEADER_BYTES = 200  # about what codec adds around the payload (ids, hashes, crc, stats)
METHODS = ("fedavg", "fedavg-ft", "standalone", "topk")


def dense_spec(spec: ModelSpec) -> ModelSpec:
    return spec.with_(dense=True, init="kaiming_uniform")


def get_vector(model: MaskedNet) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).numpy().copy()


def set_vector(model: MaskedNet, vec: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                n = p.numel()
                p.copy_(torch.from_numpy(vec[offset:offset + n].reshape(p.shape)))
                offset += n


def run_baseline(method: str, data: FederatedDataset, spec: ModelSpec, cfg: TrainConfig, *, rounds: int,
                 sample_rate: float, local_epochs: int, seed: int, topk_fraction: float = 0.1,
                 final_local_epochs: int = 0, eval_every: int = 0,
                 progress: Progress | None = None) -> SimResult:
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    start = time.perf_counter()
    model = build_model(dense_spec(spec))
    init = get_vector(model)
    by_id = {d.device_id: d for d in data.devices}
    if method == "standalone":
        epochs = standalone_epochs(local_epochs, rounds, sample_rate, final_local_epochs)
        return _standalone(data, model, init, cfg, rounds, epochs, seed, start)

    params = init.size
    # FedAvg-FT fine-tunes final_local_epochs (the tuned knob); 0 means local_epochs, the preset's choice.
    # (Until 2026-12-03 it always took local_epochs, so the tuning grid's fine-tune axis had no effect.)
    ft_epochs = final_local_epochs or local_epochs
    global_w = init.copy()
    up = down = 0
    train_seconds = 0.0
    history = []
    # Top-k error feedback: what each device has not sent yet (float64), and how many entries it sends.
    residual: dict[str, np.ndarray] = {}
    k = topk_count(topk_fraction, params)
    for r in range(1, rounds + 1):
        sampled = sample_devices(list(by_id), sample_count(len(by_id), rate=sample_rate), seed=seed, round_id=r)
        deltas, weights = [], []
        for d in sampled:
            set_vector(model, global_w)
            sent_model = get_vector(model)  # the float32 copy of the global model a device receives
            st = local_train(model, by_id[d].train.x, by_id[d].train.y, local_epochs, cfg,
                             seed=derive_seed(seed, "round", r, d))
            train_seconds += st.seconds
            delta = get_vector(model) - global_w
            if method == "topk":
                # Against the model the device was sent, values rounded to float32 as the wire carries
                # them (until 2026-12-04: float64 against the float64 global model, which a device never holds).
                trained = get_vector(model).astype(np.float64) - sent_model
                keep, values, residual[d] = sparsify(trained, residual.get(d, np.zeros(params)), k)
                delta = np.zeros(params, np.float32)
                delta[keep] = values
                up += HEADER_BYTES + 8 * k
            else:
                up += HEADER_BYTES + 4 * params
            down += HEADER_BYTES + 4 * params
            deltas.append(delta)
            weights.append(st.samples)
        global_w = global_w + np.average(np.stack(deltas), axis=0, weights=np.asarray(weights, float))
        point = {"round": r, "uplink_mb": up / 1e6, "downlink_mb": down / 1e6}
        if eval_every and (r % eval_every == 0 or r == rounds):
            set_vector(model, global_w)
            point["accuracy"] = mean_accuracy({d: evaluate(model, v.test.x, v.test.y)[1] for d, v in by_id.items()})
        history.append(point)
        if progress:
            progress(r, rounds, point)

    test_acc, val_acc = {}, {}
    for d, dev in by_id.items():
        set_vector(model, global_w)
        if method == "fedavg-ft":  # every device fine-tunes the global model on its own data
            st = local_train(model, dev.train.x, dev.train.y, ft_epochs, cfg, seed=derive_seed(seed, "ft", d))
            train_seconds += st.seconds
            down += HEADER_BYTES + 4 * params  # each device downloads the final global model
        test_acc[d] = evaluate(model, dev.test.x, dev.test.y)[1]
        val_acc[d] = evaluate(model, dev.val.x, dev.val.y)[1]
    return SimResult(
        method=method, task=data.task, devices=len(by_id), rounds=rounds,
        personalized_accuracy=mean_accuracy(test_acc), per_device_accuracy=test_acc,
        uplink_bytes=up, downlink_bytes=down,
        uplink_bits_per_param=8 * up / (params * max(1, rounds * len(sampled))) if rounds else float("nan"),
        train_seconds=train_seconds, wall_seconds=time.perf_counter() - start, params=params,
        validation_accuracy=mean_accuracy(val_acc), history=history,
    )


def _standalone(data: FederatedDataset, model: MaskedNet, init: np.ndarray, cfg: TrainConfig, rounds: int,
                epochs: int, seed: int, start: float) -> SimResult:
    """Local training only, with as many epochs as a FedMask device trains on average (1 pruning epoch,
    local_epochs for each round it is sampled, and any final adaptation): the same total local training."""
    test_acc, val_acc, secs = {}, {}, 0.0
    for dev in data.devices:
        set_vector(model, init)
        st = local_train(model, dev.train.x, dev.train.y, epochs, cfg,
                         seed=derive_seed(seed, "standalone", dev.device_id))
        secs += st.seconds
        test_acc[dev.device_id] = evaluate(model, dev.test.x, dev.test.y)[1]
        val_acc[dev.device_id] = evaluate(model, dev.val.x, dev.val.y)[1]
    return SimResult(
        method="standalone", task=data.task, devices=len(data.devices), rounds=rounds,
        personalized_accuracy=mean_accuracy(test_acc), per_device_accuracy=test_acc,
        uplink_bytes=0, downlink_bytes=0, uplink_bits_per_param=0.0, train_seconds=secs,
        wall_seconds=time.perf_counter() - start, params=init.size,
        validation_accuracy=mean_accuracy(val_acc), extra={"local_epochs_total": epochs},
    )
