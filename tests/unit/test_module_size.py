"""Modules in the domain and service packages stay small enough to read in one sitting."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 450  # the aim is 400; past 450 a module is split along a seam (see shared/codec_checks.py)


def test_no_module_in_shared_aggregator_or_worker_exceeds_the_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for d in ("shared", "aggregator", "worker") for p in (ROOT / d).rglob("*.py")}
    assert len(sizes) > 40
    assert not {path: n for path, n in sizes.items() if n > MAX_LINES}
