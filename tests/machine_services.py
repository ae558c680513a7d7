"""Proof that a test session left the machine's own RabbitMQ and Redis as it found them.

Users run `make test` on machines whose broker and Redis serve other work, so no test may stop,
restart or reconfigure them (cases that need to start their own: tests/private_services.py). The
session fixture in tests/conftest.py takes a `Snapshot` before the first test and checks it after
the last one:

- an AMQP connection (heartbeats off, so an idle session does not lose it) and a Redis connection are
  held open for the whole session: a broker `stop_app`, a node restart or a Redis restart drops them;
- Redis's run_id (new at every start) and its whole CONFIG; the broker node's uptime, memory and disk
  limits, and the policies and global parameters of the vhosts that existed before the session.
"""

from __future__ import annotations

import json
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pika  # type: ignore[import-untyped, unused-ignore]
import redis


def _api(management_url: str, path: str) -> Any:
    req = urllib.request.Request(f"{management_url}/api{path}",
                                 headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@dataclass
class Snapshot:
    amqp_url: str
    redis_url: str
    management_url: str
    connection: Any = None
    client: redis.Redis | None = None
    redis_run_id: str = ""
    redis_config: dict[str, str] | None = None
    broker: dict[str, Any] | None = None
    vhosts: list[str] | None = None

    def take(self) -> None:
        params = pika.URLParameters(self.amqp_url)
        params.heartbeat = 0  # an idle session must not lose the connection
        params.blocked_connection_timeout = None
        self.connection = pika.BlockingConnection(params)
        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        info = self.client.info("server")
        self.redis_run_id = str(info["run_id"])
        self.redis_config = self._redis_config()
        self.vhosts = sorted(v["name"] for v in _api(self.management_url, "/vhosts"))
        self.broker = self._broker()

    def _redis_config(self) -> dict[str, str]:
        assert self.client is not None
        raw = self.client.config_get("*")
        return {str(k): str(v) for k, v in raw.items()}

    def _broker(self, vhosts: set[str] | None = None) -> dict[str, Any]:
        """vhosts: whose policies to compare (default: those that existed before the session; a vhost
        someone else deleted meanwhile is left out of both sides)."""
        nodes = _api(self.management_url, "/nodes")
        keep = set(self.vhosts or []) if vhosts is None else vhosts
        policies = sorted((p["vhost"], p["name"], json.dumps(p, sort_keys=True))
                          for p in _api(self.management_url, "/policies") if p["vhost"] in keep)
        return {
            "nodes": {n["name"]: {k: n.get(k) for k in ("mem_limit", "disk_free_limit")} for n in nodes},
            "uptime_ms": {n["name"]: n.get("uptime", 0) for n in nodes},
            "policies": policies,
            "global_parameters": _api(self.management_url, "/global-parameters"),
        }

    def problems(self) -> list[str]:
        """What changed since `take` (empty: the services were left as found)."""
        assert self.client is not None and self.broker is not None
        found: list[str] = []
        try:
            self.connection.process_data_events(time_limit=0)
            if not self.connection.is_open:
                found.append("the broker closed a connection held since the session began (stopped or restarted)")
        except Exception as exc:
            found.append(f"the broker dropped a connection held since the session began: {exc!r}")
        try:
            run_id = str(self.client.info("server")["run_id"])
            if run_id != self.redis_run_id:
                found.append("Redis was restarted (its run_id changed)")
            config = self._redis_config()
            changed = sorted(k for k in set(config) | set(self.redis_config or {})
                             if config.get(k) != (self.redis_config or {}).get(k))
            if changed:
                found.append(f"Redis CONFIG changed: {changed}")
        except redis.RedisError as exc:
            found.append(f"Redis is gone or was restarted: {exc!r}")
        still = {v["name"] for v in _api(self.management_url, "/vhosts")} & set(self.vhosts or [])
        after = self._broker(still)
        before = {**self.broker, "policies": [p for p in self.broker["policies"] if p[0] in still]}
        for node, uptime in after["uptime_ms"].items():
            if uptime < self.broker["uptime_ms"].get(node, 0):
                found.append(f"RabbitMQ node {node} was restarted (uptime went back)")
        for key in ("nodes", "policies", "global_parameters"):
            if after[key] != before[key]:
                found.append(f"RabbitMQ {key} changed: {before[key]} -> {after[key]}")
        return found

    def release(self) -> None:
        if self.connection is not None and self.connection.is_open:
            self.connection.close()
        if self.client is not None:
            self.client.close()


def management_url_for(amqp_url: str) -> str:
    """The management API beside a local broker (the default port: tests use the machine's broker)."""
    return f"http://{urlparse(amqp_url).hostname or '127.0.0.1'}:15672"
