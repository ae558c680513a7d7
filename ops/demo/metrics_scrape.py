"""The demo reads the aggregator's Prometheus endpoint as Prometheus would, and reports what it saw.

It scrapes once per closed round and once at the end (before the aggregator stops); the report keeps
the last scrape's value of every metric the operator docs name (REPORTED) and the ingest rate between
the first and last scrape, the figure a dashboard draws with rate(fedmask_updates_stored_total[1m]).
"""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

# Every family `make demo`'s report shows: the counters named in issue 11 and the gauges next to them.
REPORTED: Final = (
    "fedmask_updates_received_total", "fedmask_hellos_received_total", "fedmask_updates_stored_total",
    "fedmask_updates_rejected_total", "fedmask_updates_duplicate_total", "fedmask_late_updates_total",
    "fedmask_late_updates_parked", "fedmask_rounds_closed_total", "fedmask_devices_enrolled", "fedmask_devices_alive",
    "fedmask_devices_unreachable", "fedmask_round_current", "fedmask_round_state",
    "fedmask_round_close_seconds", "fedmask_round_mean_val_accuracy",
)

Samples = dict[str, float]  # "name" or "name{k=v,...}" -> value


def free_port() -> int:
    """A port nothing listens on now (the aggregator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> tuple[set[str], Samples]:
    """(the family names, with _total for counters, that the text declares; every sample by key)."""
    names, samples = set(), {}
    for fam in text_string_to_metric_families(text):
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return names, samples


class Scraper:
    def __init__(self, url: str, clock: Any = time.time) -> None:
        self.url, self.clock = url, clock
        self.scrapes: list[tuple[float, set[str], Samples]] = []
        self.failures = 0

    def scrape(self) -> None:
        """One scrape; a failure is counted (the report says so), never raised into the run."""
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            self.failures += 1
            return
        self.scrapes.append((self.clock(), *parse(text)))

    def summary(self) -> dict[str, Any]:
        if not self.scrapes:
            return {"endpoint": self.url, "scrapes": 0, "failures": self.failures, "families": [], "last": {},
                    "missing": list(REPORTED)}
        (t0, _, first), (t1, names, last) = self.scrapes[0], self.scrapes[-1]
        stored = "fedmask_updates_stored_total"
        rate = (last.get(stored, 0) - first.get(stored, 0)) / (t1 - t0) if t1 > t0 else None
        return {"endpoint": self.url, "scrapes": len(self.scrapes), "failures": self.failures,
                "families": sorted(names), "missing": [n for n in REPORTED if n not in names],
                "last": {k: v for k, v in sorted(last.items()) if k.startswith("fedmask_")},
                "ingest_updates_per_s": rate}


def _sum(last: Samples, name: str) -> float:
    return sum(v for k, v in last.items() if k == name or k.startswith(name + "{"))


def render(m: dict[str, Any]) -> str:
    """The report's metrics lines: every counter family, from the last scrape."""
    if not m["scrapes"]:
        return f"metrics: no scrape of {m['endpoint']} succeeded ({m['failures']} failed)"
    last = m["last"]

    def g(key: str) -> str:
        v = last.get(key)
        return "-" if v is None else f"{v:.0f}"

    reasons = ", ".join(f"{k.split('reason=')[1].rstrip('}')} {v:.0f}" for k, v in last.items()
                        if k.startswith("fedmask_updates_rejected_total{"))
    state = next((k.split("state=")[1].rstrip("}") for k, v in last.items()
                  if k.startswith("fedmask_round_state{") and v == 1), "-")
    count, total = last.get("fedmask_round_close_seconds_count", 0), last.get("fedmask_round_close_seconds_sum", 0)
    rate = m["ingest_updates_per_s"]
    val = last.get("fedmask_round_mean_val_accuracy")
    lines = [
        f"metrics ({m['scrapes']} scrapes of {m['endpoint']}): updates received {g('fedmask_updates_received_total')}, "
        f"stored {g('fedmask_updates_stored_total')}, rejected {_sum(last, 'fedmask_updates_rejected_total'):.0f}"
        f"{f' ({reasons})' if reasons else ''}, duplicates {g('fedmask_updates_duplicate_total')}, hellos "
        f"{g('fedmask_hellos_received_total')}",
        "  late updates " + ", ".join(f"{o} {g(f'fedmask_late_updates_total{{outcome={o}}}')}"
                                      for o in ("carried", "dropped", "expired")) +
        f", parked now {g('fedmask_late_updates_parked')}" +
        f"; devices enrolled {g('fedmask_devices_enrolled')}, alive {g('fedmask_devices_alive')}, unreachable "
        f"{g('fedmask_devices_unreachable')}",
        f"  round {g('fedmask_round_current')} {state}, {g('fedmask_rounds_closed_total')} closed; close latency "
        f"mean {1e3 * total / count if count else 0:.0f} ms over {count:.0f}; ingest "
        f"{'-' if rate is None else f'{rate:.2f}'} updates/s; newest closed round mean val acc "
        f"{'-' if val is None else f'{val:.3f}'}",
    ]
    if m["missing"]:
        lines.append(f"  missing from the scrape: {', '.join(m['missing'])}")
    return "\n".join(lines)
