"""A worker's outbox: the update it trained, kept on disk until the broker confirms it.

Files beside the device's state (<state_dir>/<id>.npz):
  <id>.outbox   the pending update: its round, the encoded update, and the device's state after training
                (DeviceRuntime.save's bytes), in one file, so the update and the state it came from are
                written in one atomic step and can never disagree
  <id>.sent     the newest round whose update the broker confirmed (one line of text)

Every write is a temporary file, fsync, rename over the old name, fsync of the folder: a kill or a power
cut leaves either the old file or the new one, never half of one.

Why the state rides in the outbox: a worker killed after training retrains the task when it comes back
(the task is redelivered: it is acked only after the confirm). From the state before training that is
bit-identical (training is seeded per round); from the state after training it would train twice. So
the trained state reaches <id>.npz only after the outbox holds it, and <id>.sent says a round is done:
every kill point then either retrains from the old state or re-sends the outbox (worker/runtime.py has
the sequence and each kill point's outcome).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FedMaskError

_MAGIC = b"FMOUTBOX1\n"
_MAX_HEADER = 4096


class OutboxError(FedMaskError):
    """The outbox file is unreadable (its checksum or layout is wrong): disk corruption, never a kill."""


@dataclass(frozen=True)
class PendingUpdate:
    round_id: int
    body: bytes  # the encoded update, as published
    state: bytes  # the device's state after training (an .npz file's bytes)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Make a file another writer renamed into place durable (its data, then its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.path = state_dir / f"{device_id}.outbox"
        self.sent_path = state_dir / f"{device_id}.sent"

    def put(self, round_id: int, body: bytes, state: bytes) -> None:
        """Keep the round's update and the trained state until `confirmed`."""
        header = json.dumps({"round": int(round_id), "body_len": len(body), "state_len": len(state),
                             "sha256": hashlib.sha256(body + state).hexdigest()}).encode()
        write_atomic(self.path, _MAGIC + header + b"\n" + body + state)

    def pending(self) -> PendingUpdate | None:
        """The update waiting for its confirm, if any."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.startswith(_MAGIC):
            raise OutboxError(f"{self.path} is not an outbox file")
        end = raw.find(b"\n", len(_MAGIC), len(_MAGIC) + _MAX_HEADER)
        if end < 0:
            raise OutboxError(f"{self.path} has no header")
        try:
            header = json.loads(raw[len(_MAGIC):end])
            round_id, body_len, state_len, digest = (int(header["round"]), int(header["body_len"]),
                                                     int(header["state_len"]), str(header["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise OutboxError(f"{self.path} has a bad header: {exc}") from None
        payload = raw[end + 1:]
        if len(payload) != body_len + state_len or hashlib.sha256(payload).hexdigest() != digest:
            raise OutboxError(f"{self.path} is damaged (length or checksum): remove it to retrain the task")
        return PendingUpdate(round_id, payload[:body_len], payload[body_len:])

    def confirmed(self, round_id: int) -> None:
        """The broker confirmed the round's update: record the round as sent, then drop the outbox (a
        kill in between leaves both, and the update is sent once more: the aggregator drops duplicates)."""
        write_atomic(self.sent_path, f"{int(round_id)}\n".encode())
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    def last_sent(self) -> int:
        """The newest round whose update was confirmed (-1 when none was)."""
        try:
            return int(self.sent_path.read_text().strip())
        except FileNotFoundError:
            return -1
        except ValueError:
            raise OutboxError(f"{self.sent_path} does not hold a round number") from None
