"""shared/log_safety.py: escaping what a device sent, JSON log lines, rejections at a bounded rate."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shared.log_safety import JsonLogFormatter, RejectionLog, printable

FORGED = 'device.m.x\n{"t":"2026","level":"ERROR","logger":"fedmask","msg":"forged"}'


@pytest.mark.parametrize(("raw", "shown"), [
    ("device.alice.update", "device.alice.update"),
    (FORGED, 'device.m.x\\x0a{\\"t\\":\\"2026\\",\\"level\\":\\"ERROR\\",'
             '\\"logger\\":\\"fedmask\\",\\"msg\\":\\"forged\\"}'),
    ("a\rb\tc\x00d\x1b[31m", "a\\x0db\\x09c\\x00d\\x1b[31m"),
    ("line\u2028sep\u200bzero-width\x85nel", "line\\u2028sep\\u200bzero-width\\x85nel"),
    ("back\\slash 'q'", "back\\\\slash \\'q\\'"),
    (b"\xff\xfebytes", "\\\\xff\\\\xfebytes"),
    ("Grüße ünïcode 设备", "Grüße ünïcode 设备"),
    (42, "42"),
])
def test_printable_escapes_everything_that_could_break_a_line(raw: object, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()


def test_printable_truncates_and_says_how_much() -> None:
    assert printable("x" * 300, 10) == "x" * 10 + "...(+290 chars)"
    assert printable("\n" * 300, 4) == "\\x0a" * 4 + "...(+296 chars)"


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_a_json_line_holds_any_message_as_one_field() -> None:
    logger, out = _logger("test.json")
    logger.warning("rejected %s", FORGED)  # even unescaped, json.dumps keeps it in "msg"
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("handler failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == f"rejected {FORGED}" and set(first) == {"t", "level", "logger", "msg"}
    assert second["exc"].startswith("Traceback") and "boom" in second["exc"]


def test_rejections_are_logged_once_per_reason_per_window_with_a_count() -> None:
    logger, out = _logger("test.rejections")
    now = [0.0]
    rejections = RejectionLog(logger, window=10.0, clock=lambda: now[0])
    for i in range(1000):
        rejections.note("undecodable", f"device.m.update #{i}")
        rejections.note("bad_properties", "device.m.update")
    now[0] = 5.0
    rejections.flush()  # still inside the window: nothing new
    assert len(out.getvalue().splitlines()) == 2
    now[0] = 11.0
    rejections.flush()
    lines = [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
    assert lines[:2] == ["rejected (undecodable): device.m.update #0", "rejected (bad_properties): device.m.update"]
    assert sorted(lines[2:]) == sorted([
        "rejected (undecodable) 999 more times in the last 11 s, not logged one by one; the last: device.m.update #999",
        "rejected (bad_properties) 999 more times in the last 11 s, not logged one by one; the last: device.m.update",
    ])
    assert rejections.counts == {"undecodable": 1000, "bad_properties": 1000}
    rejections.note("undecodable", "again")  # a new window: written at once
    assert json.loads(out.getvalue().splitlines()[-1])["msg"] == "rejected (undecodable): again"


def test_a_traceback_comes_only_with_the_line_that_is_written() -> None:
    logger, out = _logger("test.tracebacks")
    rejections = RejectionLog(logger, window=60.0, clock=lambda: 0.0)
    for _ in range(50):
        try:
            raise RuntimeError("handler bug")
        except RuntimeError:
            rejections.note("handler_error", "device.m.update", exc_info=True)
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(entries) == 1 and "handler bug" in entries[0]["exc"]


def test_a_reason_from_a_device_is_escaped_too() -> None:
    logger, out = _logger("test.reasons")
    RejectionLog(logger).note("x\ny", "d")
    assert json.loads(out.getvalue())["msg"] == "rejected (x\\x0ay): d"
