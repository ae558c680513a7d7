"""What the devices of a round report about their learning, and one history row per round.

Every stored update carries its training statistics (shared/codec.py `Stats`: samples, training loss
and accuracy, validation accuracy, train seconds). The aggregator writes them, already checked by the
codec, into the round's stats hash (`<p>{r<r>}:stats`, device -> json) in the same round trip that
marks the device reported (RoundStore.note_update). `round status`, `round watch`, `round history`
and the demo read them here. Only on-time updates are kept: a late update's statistics describe a
round that has closed, and the round it is carried into did not train it.

Means are over the devices that reported the value (not weighted by samples), as the personalized
accuracy is a mean over devices.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, cast

from aggregator.store import RoundInfo, RoundStore
from shared.codec import Stats

STAT_FIELDS: Final = ("samples", "loss", "accuracy", "val_accuracy", "train_seconds")
MEAN_FIELDS: Final = {"loss": "mean_train_loss", "accuracy": "mean_train_accuracy",
                      "val_accuracy": "mean_val_accuracy"}


def stats_row(stats: Stats | None) -> dict[str, float]:
    """The fields a device reported (None ones left out), as RoundStore.note_update stores them."""
    if stats is None:
        return {}
    return {k: v for k in STAT_FIELDS if (v := getattr(stats, k)) is not None}


def round_stats(store: RoundStore, round_id: int) -> dict[str, dict[str, float]]:
    """device -> its reported stats, for the devices whose update was stored in `round_id`."""
    return rounds_stats(store, [round_id])[round_id]


def rounds_stats(store: RoundStore, round_ids: list[int]) -> dict[int, dict[str, dict[str, float]]]:
    """round_stats for several rounds in one round trip."""
    with store._guard("round_stats"):
        pipe = store.client.pipeline(transaction=False)
        for r in round_ids:
            pipe.hgetall(store.keys.in_round(r, "stats"))
        raws = cast(list[dict[bytes, bytes]], pipe.execute())
    return {r: {k.decode(): _row(v) for k, v in sorted(raw.items())} for r, raw in zip(round_ids, raws, strict=True)}


def _row(raw: bytes) -> dict[str, float]:
    """One stored row; anything that is not a finite number is left out (the codec checked it on the way
    in, so this only guards against a hand-edited store)."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {k: float(v) for k, v in parsed.items()
            if k in STAT_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def mean_stats(per_device: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """mean_train_loss, mean_train_accuracy, mean_val_accuracy over the devices that reported each."""
    out: dict[str, float | None] = {}
    for field, name in MEAN_FIELDS.items():
        values = [row[field] for row in per_device.values() if field in row]
        out[name] = sum(values) / len(values) if values else None
    return out


def history_row(info: RoundInfo, per_device: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One row of `fedmask round history`."""
    closed = info.state == "closed"
    return {"round": info.round_id, "state": info.state, "sampled": len(info.sampled),
            "received": len(info.received), "carried": len(info.carried),
            "merged": len(info.received) + len(info.carried) if closed else None,
            "late": len(info.late), "quorum": info.quorum, "opened_at": info.opened_at,
            "duration_s": None if info.closed_at is None else round(info.closed_at - info.opened_at, 3),
            "close_latency_s": None if info.close_seconds is None else round(info.close_seconds, 4),
            "reported_stats": len(per_device), **mean_stats(per_device)}


def history(store: RoundStore, last: int | None = None) -> list[dict[str, Any]]:
    """One row per round, oldest first (only the newest `last` rounds when given)."""
    with store._guard("round_ids"):
        ids = [int(m) for m in cast(list[bytes], store.client.zrange(store.keys.key("rounds"), 0, -1))]
    if last is not None:
        ids = ids[-last:] if last > 0 else []
    stats = rounds_stats(store, ids)
    rows = []
    for r in ids:
        info = store.info(r)
        if info is not None:  # a round removed by hand between the two reads
            rows.append(history_row(info, stats[r]))
    return rows
