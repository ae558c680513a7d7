"""worker/outbox.py: the pending update and its trained state on disk, and the worker's fault points."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from worker.outbox import Outbox, OutboxError
from worker.runtime import worker_fault_plan


def test_an_update_is_kept_until_confirmed_then_the_round_is_recorded_as_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "d1")
    assert box.pending() is None and box.last_sent() == -1
    box.put(3, b"update-3", b"state-after-3")
    pending = box.pending()
    assert pending is not None and (pending.round_id, pending.body, pending.state) == (3, b"update-3", b"state-after-3")
    assert Outbox(tmp_path, "d1").pending() == pending  # what a restarted worker reads
    box.confirmed(3)
    assert box.pending() is None and box.last_sent() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1.sent"]  # no temporary files left


def test_a_damaged_outbox_is_refused_not_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "d1")
    box.put(1, b"u" * 10, b"s" * 10)
    raw = box.path.read_bytes()
    box.path.write_bytes(raw[:-1] + b"x")  # one byte of the state changed
    with pytest.raises(OutboxError, match="checksum"):
        box.pending()
    box.path.write_bytes(b"something else")
    with pytest.raises(OutboxError, match="not an outbox"):
        box.pending()


def test_worker_fault_plan_parses_point_and_count() -> None:
    assert worker_fault_plan(None) is None and worker_fault_plan("") is None
    assert worker_fault_plan("saved") == ("saved", 1) and worker_fault_plan("published:2") == ("published", 2)
    for bad in ("nowhere", "saved:0", "saved:x"):
        with pytest.raises(ConfigError):
            worker_fault_plan(bad)
