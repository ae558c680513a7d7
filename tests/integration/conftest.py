"""Fixtures shared by the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from aggregator.store import RoundStore


@pytest.fixture()
def store(redis_service_url: str) -> Iterator[RoundStore]:
    """A RoundStore under a key prefix of its own (tests share one Redis db), emptied afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    s = RoundStore.from_url(redis_service_url, prefix=prefix)
    yield s
    keys = list(s.client.scan_iter(match=f"{prefix}*".encode(), count=500))
    if keys:
        s.client.delete(*keys)
    s.close()
