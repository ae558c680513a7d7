"""The edge worker of a weight-training strategy (`fedmask worker --strategy S`, issue 12): the device
half (worker/strategy_runtime.StrategyWorker) driven by messages from the board's own queue.

It follows FedMask's worker (worker/runtime.py) where the two meet, so a kill anywhere ends as an
undisturbed run: a task is acked last; the update and the trained state go to the outbox before the
state file is replaced and before the publish; `<id>.sent` records the last round sent, so a
redelivered task of a sent round is acked without training again; a restart re-sends what the
outbox holds. The board announces itself with an `shello` naming its strategy and the digest of its
settings (shared/strategy_setup.py), which the aggregator checks.

A downlink of another strategy or for another device stops the worker with the reason: training on
would send updates the aggregator refuses forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared.amqp import AmqpSettings, Delivery, Outcome, Publisher
from shared.errors import CodecError, ConfigError
from shared.strategy_codec import StrategyMessage, decode_strategy, encode_strategy
from shared.strategy_setup import StrategySetup, config_fields
from worker.board_loop import PROFILES, BoardLoop
from worker.outbox import Outbox, fsync_file, write_atomic
from worker.runtime import WrongVariant
from worker.strategy_runtime import StrategyWorker

log = logging.getLogger("fedmask.worker")


class StrategyBoard(BoardLoop):
    def __init__(self, device_id: str, setup: StrategySetup, train_xy: tuple[np.ndarray, np.ndarray], *,
                 amqp: AmqpSettings, state_dir: Path, seed: int, profile: str = "jetson") -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        self.profile = PROFILES[profile]
        self.setup, self.amqp, self._device_id = setup, amqp, device_id
        cfg = setup.cfg.with_(train=setup.cfg.train.with_(threads=self.profile.threads))
        if cfg.fedmask is not None:  # FedMask's device trains with its own nested config
            cfg = cfg.with_(fedmask=replace(cfg.fedmask, train=cfg.fedmask.train.with_(threads=self.profile.threads)))
        # The settings digest is of the aggregator's settings: thread count changes speed, not results.
        self.worker = StrategyWorker(device_id, dict(config_fields(setup.name, cfg)), setup.spec, train_xy, seed)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = state_dir / f"{device_id}.npz"
        self.trained_path = state_dir / f"{device_id}.trained.npz"
        self.stats_path = state_dir / f"{device_id}.stats.jsonl"  # one line per message, as worker/runtime.py
        self.outbox = Outbox(state_dir, device_id)
        self.stop_event = threading.Event()
        self.failure: WrongVariant | None = None
        self.rounds_done = 0
        self._publisher: Publisher | None = None

    @property
    def device_id(self) -> str:
        return self._device_id

    def hello(self) -> bytes:
        """The board's shello with the settings digest as its `model`. An enrolling half's own hello
        (FedMask: it prunes once, after its first local epoch, and announces the structure) gives the
        payload; its state is saved at once, so a restarted board repeats the same structure."""
        half = self.worker.half
        if not half.enrols:
            return encode_strategy(StrategyMessage(type="shello", strategy=self.setup.name, device=self.device_id,
                                                   round=0, model=self.setup.fingerprint))
        own = half.hello()
        assert own is not None  # an enrolling half always has a hello
        self.worker.save(self.state_path)
        return encode_strategy(replace(own, model=self.setup.fingerprint))

    def enrol(self) -> None:
        """Resume from disk (the outbox's state if an update was on its way), say hello (idempotent at
        the aggregator, so on every start), and re-send an update the outbox still holds."""
        pending = self.outbox.pending()
        if pending is not None:
            write_atomic(self.state_path, pending.state)
        self.trained_path.unlink(missing_ok=True)
        if self.state_path.exists():
            self.worker.load(self.state_path)
            log.info("%s resumed from %s", self.device_id, self.state_path)
        body = self.hello()
        with Publisher(self.amqp) as pub:
            pub.publish_uplink(self.device_id, "shello", body)
            self._record(type="hello", bytes_up=len(body))
            if pending is not None:
                pub.publish_uplink(self.device_id, "supdate", pending.body)
                self.outbox.confirmed(pending.round_id)
                self._record(type="update", round=pending.round_id, bytes_up=len(pending.body), resent=True)
                log.info("%s re-sent its round %d update from the outbox", self.device_id, pending.round_id)

    def on_delivery(self, d: Delivery) -> Outcome:
        try:
            msg = decode_strategy(d.body)
            if msg.strategy != self.setup.name:
                return self._wrong_strategy(msg)
            if msg.type == "stask":
                self._record(type="task", round=msg.round, bytes_down=len(d.body))
                self._train(msg, d.body)
            elif msg.type == "smodel":
                self.worker.handle(d.body)  # checks the device; applies
                self.worker.save(self.state_path)
                self._record(type="model", round=msg.round, version=msg.model, bytes_down=len(d.body))
            else:
                raise CodecError("wrong_type", f"a board receives stask or smodel, not {msg.type}")
        except (CodecError, ConfigError) as err:
            log.error("%s dropped a bad downlink message: %s", self.device_id, err)
            return Outcome.reject(getattr(err, "reason", "bad_value"))
        return Outcome.ack()

    def _wrong_strategy(self, msg: StrategyMessage) -> Outcome:
        self.failure = WrongVariant(f"{self.device_id} runs strategy {self.setup.name} but the aggregator sent a "
                                    f"{msg.strategy} {msg.type}: start the worker with --strategy {msg.strategy} "
                                    "(`fedmask round status` shows the aggregator's)")
        log.error("%s", self.failure)
        self.stop_event.set()
        return Outcome.reject("wrong_strategy")

    def _train(self, task: StrategyMessage, body: bytes) -> None:
        if task.round <= self.outbox.last_sent():
            log.info("%s already sent its round %d update: the task is done", self.device_id, task.round)
            return
        start = time.perf_counter()
        update = self.worker.handle(body)
        assert update is not None  # an stask always answers
        spent = time.perf_counter() - start
        if self.profile.slowdown > 1:  # emulate a slower board: the same work, stretched
            time.sleep(spent * (self.profile.slowdown - 1))
        self.worker.save(self.trained_path)
        self.outbox.put(task.round, update, self.trained_path.read_bytes())
        os.replace(self.trained_path, self.state_path)
        fsync_file(self.state_path)  # before <id>.sent may say the round is done
        if self._publisher is None:
            self._publisher = Publisher(self.amqp)
        self._publisher.publish_uplink(self.device_id, "supdate", update)  # confirmed
        self.outbox.confirmed(task.round)
        self.rounds_done += 1
        loss = decode_strategy(update).stats.get("loss")
        self._record(type="update", round=task.round, bytes_up=len(update), train_s=round(spent, 3),
                     board_s=round(time.perf_counter() - start, 3), **({} if loss is None else {"loss": loss}))
        log.info("%s trained round %d in %.2fs (%s)", self.device_id, task.round, spent, self.setup.name)
