"""The edge worker: the simulator's DeviceRuntime, driven by messages from its own RabbitMQ queue.

Threading (pika is not thread-safe): the Consumer owns the connection thread and runs
`on_delivery` in a worker thread, so minutes of training never starve heartbeats. This module's
Publisher is created and used only from that worker thread.

A task, from delivery to ack, and what a kill at each point (FEDMASK_WORKER_FAULT) leads to; the task
is acked last, so after any kill it is redelivered to the restarted worker:
  train in memory               -> "trained":   <id>.npz still holds the state before training: the
                                                redelivered task is trained again, bit-identically
  outbox := (update, trained state)  -> "outboxed": the restart puts the outbox's state in <id>.npz and
                                                re-sends its update; the redelivered task is then done
  <id>.npz := trained state     -> "saved":     as "outboxed"
  publish, broker confirm       -> "published": as "outboxed" (the aggregator drops the duplicate)
  <id>.sent := round; drop outbox -> "cleared": the redelivered task's round is sent: acked at once
  ack the task
worker/outbox.py says how each file is written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared import codec
from shared.amqp import AmqpSettings, Delivery, Outcome, Publisher
from shared.device import DeviceRuntime, FedMaskConfig
from shared.errors import CodecError, FedMaskError, LayoutMismatch
from shared.fault_points import FaultPoints, parse_fault
from shared.models import ModelSpec
from worker.board_loop import PROFILES as PROFILES  # re-exported: profiles are shared by every board
from worker.board_loop import BoardLoop
from worker.outbox import Outbox, fsync_file, write_atomic

log = logging.getLogger("fedmask.worker")


# Fault injection for tests/faults/test_worker_outbox.py: FEDMASK_WORKER_FAULT=<point>[:<n>] makes the
# worker SIGKILL itself the n-th time (default 1) it reaches <point> of a task (the module docstring).
WORKER_FAULT_ENV = "FEDMASK_WORKER_FAULT"
WORKER_FAULT_POINTS = ("trained", "outboxed", "saved", "published", "cleared")


def worker_fault_plan(spec: str | None) -> tuple[str, int] | None:
    """Parse FEDMASK_WORKER_FAULT: None when unset or empty, else (point, n)."""
    return parse_fault(WORKER_FAULT_ENV, WORKER_FAULT_POINTS, spec)


class WrongVariant(FedMaskError):
    """The aggregator's downlink does not fit this worker's variant: agreement levels (enc "q4") to a
    device that uploads its hard mask, or merged bits to one that uploads samples. Model and layout
    checks cannot see this (the variants share a model), so the worker stops instead of training on."""


class Worker(BoardLoop):
    def __init__(self, device_id: str, spec: ModelSpec, cfg: FedMaskConfig, train_xy: tuple[np.ndarray, np.ndarray],
                 *, amqp: AmqpSettings, state_dir: Path, seed: int, profile: str = "jetson",
                 variant: str = "preset", val_xy: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        self.profile = PROFILES[profile]
        self.cfg = replace(cfg, train=cfg.train.with_(threads=self.profile.threads))
        self.device = DeviceRuntime(device_id, spec, self.cfg, train_xy, seed, val_xy=val_xy)
        self.variant = variant  # only for messages: the config itself is `cfg`
        self.failure: WrongVariant | None = None
        self.amqp = amqp
        self.state_path = state_dir / f"{device_id}.npz"
        self.trained_path = state_dir / f"{device_id}.trained.npz"  # the state after training, on its way
        self.outbox = Outbox(state_dir, device_id)
        self.stats_path = state_dir / f"{device_id}.stats.jsonl"  # one line per message: what a board spends
        state_dir.mkdir(parents=True, exist_ok=True)
        self._publisher: Publisher | None = None
        self.stop_event = threading.Event()
        self.rounds_done = 0
        self.faults = FaultPoints(WORKER_FAULT_ENV, WORKER_FAULT_POINTS, who="worker", log=log)  # read once

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def enrol(self) -> None:
        """Resume from disk if possible (no second pruning), else prune once; then say hello, and
        re-send an update the outbox still holds. Hello is idempotent at the aggregator, so it is sent
        on every start."""
        pending = self.outbox.pending()
        if pending is not None:  # killed after training, before the confirm: the outbox's state is the truth
            write_atomic(self.state_path, pending.state)
        self.trained_path.unlink(missing_ok=True)
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
            if pending is not None:
                pub.publish_uplink(self.device_id, "update", pending.body, user_id=self.amqp_user)
                self.outbox.confirmed(pending.round_id)
                self._record(type="update", round=pending.round_id, bytes_up=len(pending.body), board_s=0.0,
                             resent=True)
                log.info("%s re-sent its round %d update from the outbox", self.device_id, pending.round_id)

    @property
    def amqp_user(self) -> str:
        return self.amqp.username

    def on_delivery(self, d: Delivery) -> Outcome:
        try:
            msg = codec.decode(d.body)
            if msg.type == "task":
                self._record(type="task", round=msg.round, bytes_down=len(d.body))
                self._train(msg)
            elif msg.type == "mask":
                if (msg.enc == "q4") != self.cfg.takes_agreement:
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
        if task.round <= self.outbox.last_sent():
            log.info("%s already sent its round %d update: the task is done", self.device_id, task.round)
            return
        if task.deadline is not None and task.deadline < time.time():
            log.warning("%s skipped round %d: its deadline has passed", self.device_id, task.round)
            return
        start = time.perf_counter()
        update = self.device.handle_task(task)
        spent = time.perf_counter() - start
        if self.profile.slowdown > 1:  # emulate a slower board: the same work, stretched
            time.sleep(spent * (self.profile.slowdown - 1))
        self._fault("trained")
        body = codec.encode(update)
        # The order below is what makes every kill point end as an undisturbed run (module docstring).
        self.device.save(self.trained_path)
        self.outbox.put(task.round, body, self.trained_path.read_bytes())
        self._fault("outboxed")
        os.replace(self.trained_path, self.state_path)
        fsync_file(self.state_path)  # before <id>.sent may say the round is done
        self._fault("saved")
        if self._publisher is None:
            self._publisher = Publisher(self.amqp)
        self._publisher.publish_uplink(self.device_id, "update", body, user_id=self.amqp_user)  # confirmed
        self._fault("published")
        self.outbox.confirmed(task.round)
        self.rounds_done += 1
        st = update.stats
        learning = {} if st is None else {k: v for k, v in (("loss", st.loss), ("accuracy", st.accuracy),
                                                            ("val_accuracy", st.val_accuracy)) if v is not None}
        self._record(type="update", round=task.round, bytes_up=len(body), train_s=round(spent, 3),
                     board_s=round(time.perf_counter() - start, 3), **learning)
        self._fault("cleared")
        log.info("%s trained round %d in %.2fs (x%.0f profile)", self.device_id, task.round, spent,
                 self.profile.slowdown)

    def _fault(self, point: str) -> None:
        """SIGKILL this process if FEDMASK_WORKER_FAULT names `point` and this is its n-th hit."""
        self.faults.hit(point)
