"""What `fedmask round status` / `watch` show when the aggregator runs `--mode async` (no rounds)."""

from __future__ import annotations

from typing import Any

from aggregator.store import RoundStore
from aggregator.store_async import AsyncStore

ASYNC_NO_ROUNDS = ("the aggregator runs --mode async: there are no rounds to start; every board gets its next "
                   "task as soon as its update is stored (and its first on hello). `fedmask round status` "
                   "shows the stream.")


def is_async(store: RoundStore) -> bool:
    return store.config().get("mode") == "async"


def async_summary(store: RoundStore) -> dict[str, Any]:
    cfg = store.config()
    st = AsyncStore(store).state()
    c = st.counts
    return {"mode": "async", "buffer_k": int(cfg.get("buffer", "0")),
            "max_staleness": int(cfg.get("max_staleness", "0")),
            "staleness": cfg.get("staleness", ""), "merge": cfg.get("merge", ""), "version": st.version,
            "buffered": len(st.buffer),
            "pending": c.get("pending", 0), "stored": c.get("stored", 0), "replaced": c.get("replaced", 0),
            "duplicate": c.get("duplicate", 0), "merged": c.get("merged", 0), "flushes": c.get("flushes", 0),
            "dropped_removed": c.get("dropped_removed", 0),
            "boards": len(st.latest)}


def render_async(s: dict[str, Any]) -> str:
    sends = "agreement theta (q4)" if s.get("merge") == "agreement" else f"merged masks ({s.get('merge') or '?'})"
    return (f"async stream (K={s['buffer_k']}, max staleness {s['max_staleness']}, {s['staleness']}) of {sends}: "
            f"version {s['version']}, {s['buffered']} buffered ({s['pending']} pending of {s['buffer_k']}), "
            f"{s['boards']} boards\nupdates stored {s['stored']}, merged {s['merged']}, replaced {s['replaced']}, "
            f"duplicate {s['duplicate']}, dropped (board removed) {s['dropped_removed']}; flushes {s['flushes']}")
