"""`make up | down | status`: bring up RabbitMQ, Redis and the aggregator on one machine.

Where a Docker engine answers, ops/deploy/docker-compose.yml runs all three. Otherwise the services at
FEDMASK_AMQP_URL / FEDMASK_REDIS_URL are used; if they are local and not running, the machine's own
rabbitmq-server and redis-server are started (local_servers.py); the aggregator runs in the
background with a pid file and a log file in the run dir (aggregator_process.py).
When none of that is possible, the error says what to install or set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from ops.services.aggregator_process import aggregator_pid, start_aggregator, stop_aggregator
from ops.services.deployment import MANAGEMENT_PORT, ROOT, Deployment, reachable
from ops.services.local_servers import ensure_rabbitmq, ensure_redis, stop_started
from shared.errors import FedMaskError

COMPOSE_FILE = ROOT / "ops" / "deploy" / "docker-compose.yml"


def docker_available() -> bool:
    if os.environ.get("FEDMASK_NO_DOCKER") or shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def up(dep: Deployment, say: Any) -> str:
    """Returns "docker" or "local": how the services run."""
    dep.run_dir.mkdir(parents=True, exist_ok=True)
    if docker_available() and COMPOSE_FILE.exists():
        say("Docker found: starting ops/deploy/docker-compose.yml (rabbitmq, redis, aggregator) ...")
        subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "up", "-d", "--build", "--wait"], check=True)
        return "docker"
    ensure_rabbitmq(dep, say)
    ensure_redis(dep, say)
    from ops.control.enrolment import Management

    vhost = urlsplit(dep.amqp_url).path.lstrip("/") or "/"
    host = dep.amqp_host[0]
    if reachable(host, MANAGEMENT_PORT):  # devices are enrolled into this vhost
        u = urlsplit(dep.amqp_url)
        Management(f"http://{host}:{MANAGEMENT_PORT}", u.username or "guest", u.password or "guest").ensure_vhost(vhost)
    start_aggregator(dep, say)
    return "local"


def down(dep: Deployment, say: Any) -> None:
    if docker_available() and COMPOSE_FILE.exists() and aggregator_pid(dep) is None:
        subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "down"], check=True)
        return
    stop_aggregator(dep, say)
    stop_started(dep, say)


def status(dep: Deployment) -> dict[str, Any]:
    ahost, aport = dep.amqp_host
    rhost, rport = dep.redis_host
    out: dict[str, Any] = {
        "rabbitmq": {"address": f"{ahost}:{aport}", "up": reachable(ahost, aport)},
        "management_api": {"address": f"{ahost}:{MANAGEMENT_PORT}", "up": reachable(ahost, MANAGEMENT_PORT)},
        "redis": {"address": f"{rhost}:{rport}", "up": reachable(rhost, rport)},
        "aggregator": {"pid": aggregator_pid(dep), "log": str(dep.log_file)},
    }
    out["aggregator"]["up"] = out["aggregator"]["pid"] is not None
    if out["redis"]["up"]:
        from aggregator.store import RoundStore
        from ops.control.rounds import round_summary

        try:
            store = RoundStore.from_url(dep.redis_url)
            out["aggregator"]["config"] = store.config()
            out["devices"] = len(store.device_ids())
            r = store.current_round()
            info = store.info(r) if r is not None else None
            out["round"] = round_summary(info, time.time()) if info is not None else None
            out["counters"] = store.counters()
        except FedMaskError as exc:
            out["redis"]["error"] = str(exc)
    if out["management_api"]["up"]:
        out["broker_limits"] = _broker_limits(dep, out)
    return out


def _broker_limits(dep: Deployment, out: dict[str, Any]) -> dict[str, Any]:
    """The running broker's limits against the shipped ones, the running model's largest message and
    what dead.letters dropped (ops/services/broker_limits.py); read only."""
    from ops.services.broker_limits import largest_message_bytes, read_limits
    from shared.presets import model_spec

    cfg = (out.get("aggregator") or {}).get("config") or {}
    need = None
    if cfg.get("task"):
        need = largest_message_bytes(model_spec(cfg["task"], width=int(cfg["width"]) if cfg.get("width") else None,
                                                seed=int(cfg.get("seed") or 0)))
    counters = out.get("counters") or {}
    dropped = {k.rsplit(":", 1)[1]: int(v) for k, v in counters.items() if k.startswith("dead_letters:dropped:")}
    u = urlsplit(dep.amqp_url)
    return read_limits(f"http://{dep.amqp_host[0]}:{MANAGEMENT_PORT}", dep.amqp_url, unquote(u.username or "guest"),
                       unquote(u.password or "guest"), unquote(u.path.lstrip("/")) or "/", model_need=need,
                       dropped=dropped if cfg else None)


def healthy(st: dict[str, Any]) -> bool:
    """Broker, Redis and aggregator all up (`make status` exits 1 otherwise)."""
    return all(st[k]["up"] for k in ("rabbitmq", "redis", "aggregator"))


def render_status(st: dict[str, Any]) -> str:
    """The text of `fedmask services status`: one line per service, then devices and the newest round."""
    lines = [f"{name:<15} {'up' if st[name]['up'] else 'DOWN':<5} {st[name]['address']}"
             for name in ("rabbitmq", "management_api", "redis")]
    agg = st["aggregator"]
    cfg = agg.get("config") or {}
    detail = f"pid {agg['pid']}, task {cfg.get('task', '?')}" if agg["up"] else f"not running (log {agg['log']})"
    lines.append(f"{'aggregator':<15} {'up' if agg['up'] else 'DOWN':<5} {detail}")
    if "devices" in st:
        lines.append(f"{'devices':<15} {st['devices']} enrolled")
    rnd = st.get("round")
    if rnd:
        lines.append(f"{'round':<15} {rnd['round']} {rnd['state']}: {rnd['received']}/{rnd['sampled']} received "
                     f"(quorum {rnd['quorum']}), {rnd['carried']} carried, {rnd['late']} late")
    if "broker_limits" in st:
        from ops.services.broker_limits import render_limits

        lines += render_limits(st["broker_limits"])
    return "\n".join(lines)
