"""The broker limits that matter, as shipped and as a running broker has them, and where they differ.

Shipped: broker_config/rabbitmq.conf (max message size, disk and memory alarms, listener addresses),
shared/amqp/broker_topology.py (dead.letters bounds) and ops/control/enrolment.py (per-user limits).
Running: read without changing anything, through the management HTTP API (/api/overview, /api/nodes,
/api/queues, /api/user-limits) and, for the message size limit (which no API reports), one probe
publish of (shipped limit + 1) bytes to an unbound routing key: a broker with the shipped limit or a
lower one refuses it and names its limit; a broker with a higher one accepts it and drops it unrouted.

`fedmask services status` prints `render_limits` and a warning per difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from ops.control.enrolment import DEVICE_LIMITS, Management, ManagementError
from ops.services.deployment import ROOT
from shared import codec
from shared.amqp import (
    AGGREGATOR_QUEUE,
    DEAD_LETTER_LIMITS,
    DEAD_QUEUE,
    UPLINK_LIMITS,
    AmqpError,
    AmqpSettings,
    vhost_user_prefix,
)
from shared.amqp.connection import probe_max_message_size
from shared.models import ModelSpec, build_model
from shared.presets import PRESETS, model_spec

SHIPPED_CONF: Final = ROOT / "broker_config" / "rabbitmq.conf"
RABBITMQ_DEFAULT_MAX_MESSAGE: Final = 128 * 1024 * 1024  # RabbitMQ 3.10's default max_message_size
_LOOPBACK: Final = ("127.0.0.1", "::1", "localhost")


def read_conf(path: Path = SHIPPED_CONF) -> dict[str, str]:
    """A new-style (sysctl) rabbitmq.conf as key -> value; comments and blank lines skipped."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, value = (p.strip() for p in line.split("=", 1))
            out[key] = value
    return out


def _size(text: str) -> int:
    """rabbitmq.conf sizes: a plain integer, or with kB/MB/GB (powers of 10) or KiB/MiB/GiB (of 2)."""
    m = re.fullmatch(r"(\d+)\s*([KMG]i?B)?", text.strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}[unit]
    return int(m.group(1)) * scale


# ------------------------------------------------------------------------------ what a model needs


def largest_message_bytes(spec: ModelSpec) -> int:
    """The largest message the pipeline sends for `spec`, encoded by the real codec at its worst case
    (a 64-character device id, 10-digit round and version, every element in the structure): a hello
    carries 1 bit per parameter, an update at most as many (enc full), a q4 merged mask 4 bits per
    element. The q4 mask (agreement merge) is the largest."""
    net = build_model(spec)
    n = net.nbits
    head = {"device": "d" * 64, "round": 2**31 - 1, "model": net.fingerprint(), "layout": net.layout_hash()}
    full = bytes((n + 7) // 8)
    stats = codec.Stats(samples=2**31 - 1, loss=1e9, accuracy=1.0, train_seconds=1e9)
    candidates = [
        codec.make_hello(**head, structure=full, nbits=n),
        codec.make_update(**head, bits=full, nbits=n, version=2**31 - 1, enc="full", stats=stats),
        codec.make_mask(**head, bits=bytes((4 * n + 7) // 8), nbits=4 * n, version=2**31 - 1, enc="q4"),
    ]
    return max(codec.message_size(m) for m in candidates)


def shipped_models_need() -> tuple[str, int]:
    """(task, bytes): the preset model with the largest message, and that message's size."""
    return max(((task, largest_message_bytes(model_spec(task))) for task in PRESETS), key=lambda t: t[1])


# ------------------------------------------------------------------------------ shipped vs running


@dataclass(frozen=True)
class Limit:
    name: str
    running: str
    shipped: str
    ok: bool | None  # None: could not be read


def _fmt_bytes(n: int | None) -> str:
    """Sizes as rabbitmq.conf writes them: 2 GB and 50 MB are powers of ten, 256 KiB a power of two."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} B"


def _http_address(listener: dict[str, Any]) -> str:
    # The management API reports ip_address "::" even when cowboy is bound to one address: its
    # socket_opts hold the real one, and lack "ip" when it listens on every address.
    opts = listener.get("socket_opts") or {}
    return str(opts.get("ip") or "0.0.0.0 (all addresses)") if isinstance(opts, dict) else "?"


def running_limits(mgmt: Management, amqp: AmqpSettings, vhost: str, *, model_need: int | None = None,
                   dropped: dict[str, int] | None = None) -> list[Limit]:
    """The shipped limits next to the running broker's; raises ManagementError if the API is unreachable.
    `model_need`: the running model's largest message (bytes); `dropped`: the aggregator's counters of
    what dead.letters dropped, by reason (aggregator/dropped_tally.py)."""
    conf = read_conf()
    overview = mgmt.get("/overview")
    nodes = mgmt.get("/nodes") or [{}]
    node = nodes[0]
    out: list[Limit] = []

    shipped_max = int(conf["max_message_size"])
    probed: int | None = None
    try:
        probed = _probe_any_vhost(amqp, shipped_max + 1)
        running, ok = ((_fmt_bytes(probed), probed == shipped_max) if probed is not None
                       else (_above(shipped_max, node.get("config_files") or []), False))
    except AmqpError as e:
        running, ok = f"? ({e})", None
    out.append(Limit("max message size", running, _fmt_bytes(shipped_max), ok))
    if model_need is not None:
        # A limit above the shipped one is not known exactly: it fits any model the shipped one fits.
        fits: bool | None = None
        if probed is not None:
            fits = model_need <= probed
        elif ok is not None and model_need <= shipped_max:
            fits = True
        out.append(Limit("running model needs", f"{model_need:,} B per message at most", "within max message size",
                         fits))

    disk = node.get("disk_free_limit")
    shipped_disk = _size(conf["disk_free_limit.absolute"])
    out.append(Limit("disk free limit", _fmt_bytes(disk), _fmt_bytes(shipped_disk),
                     None if disk is None else int(disk) >= shipped_disk))
    mem = node.get("mem_limit")
    ratio = float(conf["vm_memory_high_watermark.relative"])
    total = _total_memory()
    shown = _fmt_bytes(mem) + (f" ({int(mem) / total:.2f} of RAM)" if mem and total else "")
    out.append(Limit("memory watermark", shown, f"{ratio:g} of RAM",
                     None if not (mem and total) else abs(int(mem) / total - ratio) < 0.02))
    for listener in overview.get("listeners") or []:
        if listener.get("protocol") == "http":
            address = _http_address(listener)
            out.append(Limit("management listener", f"{address}:{listener.get('port')}",
                             f"{conf['management.tcp.ip']}:{conf['management.tcp.port']}", address in _LOOPBACK))
    out.append(_queue_bounds(mgmt, vhost, AGGREGATOR_QUEUE, UPLINK_LIMITS))
    out.append(_queue_bounds(mgmt, vhost, DEAD_QUEUE, DEAD_LETTER_LIMITS))
    if dropped is not None:
        counted = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
        out.append(Limit("dead letters dropped", counted, "counted", True))
    out.append(_user_limits(mgmt, vhost))
    alarms = [a for a, on in (("memory", node.get("mem_alarm")), ("disk", node.get("disk_free_alarm"))) if on]
    out.append(Limit("resource alarms", ", ".join(alarms) or "none", "none", not alarms))
    return out


def _above(shipped_max: int, config_files: list[str]) -> str:
    """A limit above the shipped one, exactly when the broker's config file is readable from here."""
    for name in config_files:
        path = Path(name)
        if path.suffix == ".conf" and path.is_file():
            try:
                value = read_conf(path).get("max_message_size")
            except (OSError, UnicodeDecodeError):
                continue
            if value is None:
                return f"{_fmt_bytes(RABBITMQ_DEFAULT_MAX_MESSAGE)} (RabbitMQ's default: {name} does not set it)"
            return f"{_fmt_bytes(int(value))} (from {name})"
    return f"more than {_fmt_bytes(shipped_max)}"


def _probe_any_vhost(amqp: AmqpSettings, size: int) -> int | None:
    """The limit is the node's, not a vhost's: if the deployment's vhost refuses us, probe on "/"."""
    try:
        return probe_max_message_size(amqp, size)
    except AmqpError as e:
        if e.code not in (403, 530) or amqp.vhost == "/":
            raise
        u = urlsplit(amqp.url)
        return probe_max_message_size(AmqpSettings.from_url(urlunsplit(u._replace(path="/%2F"))), size)


def _total_memory() -> int | None:
    """This machine's RAM (the broker's, when it is local; status compares only then)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _queue_bounds(mgmt: Management, vhost: str, queue: str, bounds: dict[str, Any]) -> Limit:
    """A queue's length bounds as declared on the running broker, with its depth."""
    shipped = ", ".join(f"{k.removeprefix('x-')} {v}" for k, v in bounds.items())
    q = mgmt.get(f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}", missing_ok=True)
    if q is None:
        return Limit(f"{queue} bounds", "queue not declared yet", shipped, None)
    args = q.get("arguments") or {}
    differ = [k for k, v in bounds.items() if args.get(k) != v]
    running = ", ".join(f"{k.removeprefix('x-')} {args[k]}" for k in bounds if k in args) or "unbounded"
    return Limit(f"{queue} bounds", f"{running}; holds {q.get('messages', 0)} messages, "
                 f"{_fmt_bytes(q.get('message_bytes'))}", shipped, not differ)


def _user_limits(mgmt: Management, vhost: str) -> Limit:
    prefix = vhost_user_prefix(vhost)
    users = [u for u in mgmt.list_users() if u.startswith(prefix)]
    limits = {row["user"]: row.get("value") or {} for row in mgmt.get("/user-limits", missing_ok=True) or []}
    want = {"max-connections": DEVICE_LIMITS.max_connections, "max-channels": DEVICE_LIMITS.max_channels}
    unlimited = [u for u in users if any(limits.get(u, {}).get(k) != v for k, v in want.items())]
    running = f"{len(users) - len(unlimited)} of {len(users)} device users limited"
    if unlimited:
        running += f" (not: {', '.join(unlimited[:3])}{' ...' if len(unlimited) > 3 else ''})"
    return Limit("device user limits", running,
                 f"max-connections {DEVICE_LIMITS.max_connections}, max-channels {DEVICE_LIMITS.max_channels}",
                 not unlimited)


def read_limits(api_url: str, amqp_url: str, user: str, password: str, vhost: str, *,
                model_need: int | None = None, dropped: dict[str, int] | None = None) -> dict[str, Any]:
    """For `services status --json`: {"limits": [...], "warnings": [...]} or {"error": ...}."""
    try:
        limits = running_limits(Management(api_url, user, password, timeout=5), AmqpSettings.from_url(amqp_url),
                                vhost, model_need=model_need, dropped=dropped)
    except ManagementError as e:
        return {"error": f"limits not read: {e}"}
    warnings = [f"{lim.name}: running {lim.running}, shipped {lim.shipped}" for lim in limits if lim.ok is False]
    return {"limits": [vars(lim) for lim in limits], "warnings": warnings}


def render_limits(section: dict[str, Any]) -> list[str]:
    if "error" in section:
        return [f"{'limits':<15} {section['error']}"]
    lines = [f"  {lim['name']:<25} {lim['running']}" + ("" if lim["ok"] else f"   (shipped: {lim['shipped']})")
             for lim in section["limits"]]
    return ["broker limits:", *lines, *(f"WARNING {w}" for w in section["warnings"])]
