"""The edge worker: the simulator's DeviceRuntime, driven by messages from its own RabbitMQ queue.

Threading (pika is not thread-safe): the Consumer owns the connection thread and runs
`on_delivery` in a worker thread, so minutes of training never starve heartbeats. This module's
Publisher is created and used only from that worker thread.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shared import codec
from shared.amqp import AmqpSettings, Consumer, Delivery, Outcome, Publisher, device_queue
from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import CodecError, FedMaskError, LayoutMismatch
from shared.models import ModelSpec

log = logging.getLogger("fedmask.worker")


@dataclass(frozen=True)
class Profile:
    """Emulates a board on one machine: thread count and a slowdown applied to training time."""

    threads: int
    slowdown: float


PROFILES = {"jetson": Profile(threads=1, slowdown=1.0), "pi4": Profile(threads=1, slowdown=5.0)}


class WrongVariant(FedMaskError):
    """The aggregator's downlink does not fit this worker's variant: agreement levels (enc "q4") to a
    device that uploads its hard mask, or merged bits to one that uploads samples. Model and layout
    checks cannot see this (the variants share a model), so the worker stops instead of training on."""


class Worker:
    def __init__(self, device_id: str, spec: ModelSpec, cfg: FedMaskConfig, train_xy: tuple[np.ndarray, np.ndarray],
                 *, amqp: AmqpSettings, state_dir: Path, seed: int, profile: str = "jetson",
                 variant: str = "preset") -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        self.profile = PROFILES[profile]
        self.cfg = replace(cfg, train=cfg.train.with_(threads=self.profile.threads))
        self.device = DeviceRuntime(device_id, spec, self.cfg, train_xy, seed)
        self.variant = variant  # only for messages: the config itself is `cfg`
        self.failure: WrongVariant | None = None
        self.amqp = amqp
        self.state_path = state_dir / f"{device_id}.npz"
        self.stats_path = state_dir / f"{device_id}.stats.jsonl"  # one line per message: what a board spends
        state_dir.mkdir(parents=True, exist_ok=True)
        self._publisher: Publisher | None = None
        self.stop_event = threading.Event()
        self.rounds_done = 0

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def enrol(self) -> None:
        """Resume from disk if possible (no second pruning), else prune once; then say hello.
        Hello is idempotent at the aggregator, so it is sent on every start."""
        if self.state_path.exists():
            self.device.load(self.state_path)
            log.info("%s resumed from %s (mask version %d)", self.device_id, self.state_path, self.device.mask_version)
            hello = self.device.hello()
        else:
            hello = self.device.hello()  # prunes
            self.device.save(self.state_path)
            log.info("%s pruned once; structure saved to %s", self.device_id, self.state_path)
        body = codec.encode(hello)
        with Publisher(self.amqp) as pub:
            pub.publish_uplink(self.device_id, "hello", body, user_id=self.amqp_user)
        self._record(type="hello", bytes_up=len(body))

    def _record(self, **fields: object) -> None:
        with self.stats_path.open("a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), **fields}) + "\n")

    @property
    def amqp_user(self) -> str:
        return self.amqp.username

    def run(self) -> None:
        """Until SIGTERM/SIGINT (or stop_event): the delivery in hand is settled, the rest stay queued.
        A handler is needed: as PID 1 in a container, a process without one ignores SIGTERM."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda _s, _f: self.stop_event.set())
        torch.set_num_threads(self.profile.threads)
        self.enrol()
        consumer = Consumer(self.amqp, device_queue(self.device_id), self.on_delivery, prefetch=1)
        try:
            consumer.run(self.stop_event)
        finally:
            if self._publisher is not None:
                self._publisher.close()
        if self.failure is not None:
            raise self.failure

    def on_delivery(self, d: Delivery) -> Outcome:
        try:
            msg = codec.decode(d.body)
            if msg.type == "task":
                self._record(type="task", round=msg.round, bytes_down=len(d.body))
                self._train(msg)
            elif msg.type == "mask":
                if (msg.enc == "q4") != (self.cfg.upload == "sample"):
                    return self._wrong_variant(msg)
                self.device.handle_mask(msg)
                self.device.save(self.state_path)
                self._record(type="mask", version=msg.version, enc=msg.enc, bytes_down=len(d.body))
                log.info("%s applied merged mask v%d", self.device_id, self.device.mask_version)
            else:
                raise CodecError("wrong_type", f"a device receives task or mask, not {msg.type}")
        except (CodecError, LayoutMismatch) as err:
            log.error("%s dropped a bad downlink message: %s", self.device_id, err)
            return Outcome.reject(getattr(err, "reason", "layout_mismatch"))
        return Outcome.ack()

    def _wrong_variant(self, msg: codec.Message) -> Outcome:
        """Dead-letter the mask and stop: `run` then raises, so the process exits with the reason."""
        self.failure = WrongVariant(
            f"{self.device_id} runs variant {self.variant} (upload {self.cfg.upload}) but the aggregator sent a "
            f"{msg.enc} mask for round {msg.round}: start the worker with the aggregator's --variant "
            "(`fedmask round status` shows it)")
        log.error("%s", self.failure)
        self.stop_event.set()
        return Outcome.reject("wrong_variant")

    def _train(self, task: codec.Message) -> None:
        if task.deadline is not None and task.deadline < time.time():
            log.warning("%s skipped round %d: its deadline has passed", self.device_id, task.round)
            return
        start = time.perf_counter()
        update = self.device.handle_task(task)
        spent = time.perf_counter() - start
        if self.profile.slowdown > 1:  # emulate a slower board: the same work, stretched
            time.sleep(spent * (self.profile.slowdown - 1))
        self.device.save(self.state_path)
        if self._publisher is None:
            self._publisher = Publisher(self.amqp)
        body = codec.encode(update)
        self._publisher.publish_uplink(self.device_id, "update", body, user_id=self.amqp_user)
        self.rounds_done += 1
        self._record(type="update", round=task.round, bytes_up=len(body), train_s=round(spent, 3),
                     board_s=round(time.perf_counter() - start, 3))
        log.info("%s trained round %d in %.2fs (x%.0f profile)", self.device_id, task.round, spent,
                 self.profile.slowdown)
