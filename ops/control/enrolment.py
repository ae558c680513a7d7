"""Device enrolment through the RabbitMQ management HTTP API (stdlib urllib only).

A device gets its own broker user per vhost, `<escaped vhost>.<id>` (shared.amqp.device_user: e.g.
fedmask.subject-1), with a generated password and rights on that one vhost for exactly what it does
(ARCHITECTURE.md, "What must hold": a device can publish only as itself and read only its own queue).
Because the vhost is in the name, the same id enrolled in two vhosts is two users: each logs into
its own vhost only, and re-enrolling one never changes the other's password or closes its connections.

  configure  ^$                      declares nothing; its queue is declared here, by the operator
  write      ^fedmask\\.uplink$       publishes only to the uplink exchange ...
  read       ^device\\.<id>$          ... and consumes only its own queue
  topic      fedmask.uplink: write ^device\\.<id>\\.  read ^$   ... only with its own routing keys

RabbitMQ additionally rejects any message whose user_id property is not the connection's user, so
the aggregator can trust user_id (and maps it back with shared.amqp.device_of_user, for its own vhost
only). Re-enrolling an existing device rotates its password and closes the connections that used the
old one; its queue (and any task waiting in it) is kept.

Limits set here (RabbitMQ >= 3.10, `PUT /api/user-limits`): each device user may hold at most
`DeviceLimits.max_connections` connections and `max_channels` channels in total, so a stolen board
cannot open hundreds of them. A broker without user limits gets a warning and no limits.

What permissions cannot stop: a passive queue.declare is not permission-checked by RabbitMQ (3.10,
verified by tests/integration/test_broker_limits.py), so a board that guesses another queue's name
in its vhost learns that it exists, its ready-message count and its consumer count; docs/deployment.md.

Errors are `ManagementError` (a FedMaskError); they never contain a password.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from shared.amqp import (
    UPLINK_EXCHANGE,
    Topology,
    device_queue,
    device_topology,
    device_user,
    topology,
    validate_device_id,
)
from shared.errors import FedMaskError

log = logging.getLogger("fedmask.enrolment")

DEFAULT_VHOST = "fedmask"
AGGREGATOR_USER = "fedmask-aggregator"


@dataclass(frozen=True)
class DeviceLimits:
    """Per-user broker limits of a device user. A worker holds 2 connections with 1 channel each
    (its task consumer and its update publisher; the hello publisher before them is closed); the
    rest is room for reconnects while the broker has not yet noticed, by missed heartbeats (up to
    about 60 s), that a board's previous connection is gone."""

    max_connections: int = 4
    max_channels: int = 8


DEVICE_LIMITS = DeviceLimits()


class ManagementError(FedMaskError):
    """The management API was unreachable or refused a request; `status` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """A broker user and the AMQP URL to connect as it. The password is kept out of repr."""

    username: str
    password: str = field(repr=False)
    amqp_url: str = field(repr=False)


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    username: str
    password: str = field(repr=False)
    amqp_url: str = field(repr=False)  # for the device: its own user on its own vhost
    limits: DeviceLimits | None = DEVICE_LIMITS  # None: the broker has no per-user limits (< 3.10)


def _esc(name: str) -> str:
    """Escape a name for a regex in a permission (dots are the only metacharacter our names use)."""
    return name.replace(".", "\\.")


def _amqp_url(username: str, password: str, host: str, port: int, vhost: str) -> str:
    return f"amqp://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(vhost, safe='')}"


class Management:
    """A thin client of the RabbitMQ management HTTP API (the rabbitmq_management plugin)."""

    def __init__(self, api_url: str = "http://127.0.0.1:15672", user: str = "guest", password: str = "guest",
                 *, timeout: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.user = user
        self._password = password
        self.timeout = timeout
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    # -- HTTP

    def _request(self, method: str, path: str, body: Any = None, *, secret: str = "",
                 missing_ok: bool = False) -> Any:
        url = f"{self.api_url}/api{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": self._auth, "Content-Type": "application/json"})

        def scrub(text: str) -> str:
            for s in (secret, self._password):
                if s:
                    text = text.replace(s, "***")
            return text

        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and missing_ok:
                return None
            detail = ""
            try:
                payload = json.loads(e.read() or b"{}")
                detail = str(payload.get("reason") or payload.get("error") or "")
            except (ValueError, AttributeError):
                pass
            if e.code == 401:
                msg = f"management API at {self.api_url} refused user {self.user!r} (401): wrong password, or " \
                      "the user lacks the administrator tag"
            elif e.code == 404:
                msg = f"management API: {method} {path} not found (404){': ' + detail if detail else ''}"
            else:
                msg = f"management API: {method} {path} failed ({e.code}){': ' + detail if detail else ''}"
            raise ManagementError(scrub(msg), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ManagementError(
                f"RabbitMQ management API at {self.api_url} is unreachable ({scrub(str(reason))}); "
                "enable it: rabbitmq-plugins enable rabbitmq_management") from None
        return json.loads(raw) if raw else None

    def get(self, path: str, *, missing_ok: bool = False) -> Any:
        """GET one API path (e.g. "/overview"): read-only, for status and tests. None if missing and missing_ok."""
        return self._request("GET", path, missing_ok=missing_ok)

    # -- vhost and topology

    def ensure_vhost(self, vhost: str = DEFAULT_VHOST) -> None:
        """Create the vhost if missing and give the management user full rights on it (so an admin
        AMQP connection can declare the topology). Idempotent."""
        self._request("PUT", f"/vhosts/{quote(vhost, safe='')}", {"description": "FedMask", "tags": "fedmask"})
        self._set_permissions(self.user, vhost, ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        """Delete a vhost and everything in it (tests use throwaway vhosts). Missing is fine."""
        self._request("DELETE", f"/vhosts/{quote(vhost, safe='')}", missing_ok=True)

    def ensure_topology(self, vhost: str = DEFAULT_VHOST) -> None:
        """Declare exchanges, queues and bindings exactly as shared.amqp.declare_topology does. Idempotent."""
        self._declare(vhost, topology())

    def _declare(self, vhost: str, topo: Topology) -> None:
        v = quote(vhost, safe="")
        for ex in topo.exchanges:
            self._request("PUT", f"/exchanges/{v}/{quote(ex.name, safe='')}",
                          {"type": ex.type, "durable": True, "auto_delete": False, "internal": False, "arguments": {}})
        for q in topo.queues:
            self._request("PUT", f"/queues/{v}/{quote(q.name, safe='')}",
                          {"durable": True, "auto_delete": False, "arguments": dict(q.arguments)})
        for b in topo.bindings:
            # Binding an already bound pair is a no-op, over HTTP as over AMQP.
            self._request("POST", f"/bindings/{v}/e/{quote(b.exchange, safe='')}/q/{quote(b.queue, safe='')}",
                          {"routing_key": b.routing_key, "arguments": {}})

    # -- users

    def list_users(self) -> list[str]:
        return sorted(u["name"] for u in self._request("GET", "/users") or [])

    def _put_user(self, username: str, password: str, tags: str = "") -> None:
        self._request("PUT", f"/users/{quote(username, safe='')}", {"password": password, "tags": tags},
                      secret=password)

    def _set_permissions(self, username: str, vhost: str, configure: str, write: str, read: str) -> None:
        self._request("PUT", f"/permissions/{quote(vhost, safe='')}/{quote(username, safe='')}",
                      {"configure": configure, "write": write, "read": read})

    def list_connections(self) -> list[dict[str, Any]]:
        """Open AMQP connections: name, user, vhost and the client's connection_name. The management
        API refreshes this list every few seconds, so a brand-new connection may be missing."""
        return [{"name": c["name"], "user": c.get("user"), "vhost": c.get("vhost"),
                 "connection_name": (c.get("client_properties") or {}).get("connection_name")}
                for c in self._request("GET", "/connections") or []]

    def close_connection(self, name: str) -> None:
        self._request("DELETE", f"/connections/{quote(name, safe='')}", missing_ok=True)

    def close_connections(self, username: str) -> int:
        """Close every AMQP connection of a user (after a password change or deletion). Returns how many."""
        conns = self._request("GET", f"/connections/username/{quote(username, safe='')}", missing_ok=True) or []
        for c in conns:
            self.close_connection(c["name"])
        return len(conns)

    def user_limits(self, username: str) -> dict[str, int]:
        """The user's limits as the broker holds them ({} when none are set)."""
        rows = self._request("GET", f"/user-limits/{quote(username, safe='')}", missing_ok=True) or []
        return {k: int(v) for row in rows for k, v in (row.get("value") or {}).items()}

    def set_user_limits(self, username: str, limits: DeviceLimits) -> bool:
        """Set max-connections and max-channels; False (and a warning) on a broker without user limits
        (RabbitMQ < 3.10 has no /api/user-limits: the request is 404 for a user that exists)."""
        for name, value in (("max-connections", limits.max_connections), ("max-channels", limits.max_channels)):
            try:
                self._request("PUT", f"/user-limits/{quote(username, safe='')}/{name}", {"value": value})
            except ManagementError as e:
                if e.status not in (404, 405):
                    raise
                log.warning("this broker has no per-user limits (RabbitMQ >= 3.10 needed): %s has no connection "
                            "or channel limit", username)
                return False
        return True

    def enroll(self, device_id: str, *, vhost: str = DEFAULT_VHOST, amqp_host: str = "127.0.0.1",
               amqp_port: int = 5672, limits: DeviceLimits = DEVICE_LIMITS) -> DeviceCredentials:
        """Create (or re-create, rotating the password) the device's user of `vhost`, its rights there,
        its limits and its queue. Users of other vhosts, the same device id included, are not touched."""
        try:
            validate_device_id(device_id)
        except FedMaskError as e:
            raise ManagementError(str(e)) from None
        username = device_user(device_id, vhost)
        password = secrets.token_urlsafe(24)
        self.ensure_vhost(vhost)
        self.ensure_topology(vhost)
        existing = self._request("GET", f"/users/{quote(username, safe='')}", missing_ok=True)
        if existing is not None and existing.get("tags"):
            # Device users never have tags; one with tags is an operator's user that happens to be named
            # like a device user. Overwriting it would reset its password and strip its tags.
            raise ManagementError(f"user {username!r} exists with tags {existing.get('tags')!r}: it is not a "
                                  "device user, refusing to overwrite it")
        self._put_user(username, password, tags="")
        self._set_permissions(username, vhost, configure="^$", write=f"^{_esc(UPLINK_EXCHANGE)}$",
                              read=f"^{_esc(device_queue(device_id))}$")
        self._request("PUT", f"/topic-permissions/{quote(vhost, safe='')}/{quote(username, safe='')}",
                      {"exchange": UPLINK_EXCHANGE, "write": f"^device\\.{device_id}\\.", "read": "^$"})
        applied = self.set_user_limits(username, limits)
        self._declare(vhost, device_topology(device_id))
        if existing is not None:
            self.close_connections(username)  # the old password must stop working now, not at reconnect
        return DeviceCredentials(device_id, username, password,
                                 _amqp_url(username, password, amqp_host, amqp_port, vhost),
                                 limits if applied else None)

    def is_enrolled(self, device_id: str, *, vhost: str = DEFAULT_VHOST) -> bool:
        """The device's user of `vhost` exists and holds permissions there."""
        username = device_user(device_id, vhost)
        return self._request("GET", f"/permissions/{quote(vhost, safe='')}/{quote(username, safe='')}",
                             missing_ok=True) is not None

    def delete_device(self, device_id: str, *, vhost: str = DEFAULT_VHOST, delete_queue: bool = True) -> None:
        """Remove the device's user of `vhost` (its permissions and limits go with it), its connections
        and, by default, its queue. Missing pieces are fine."""
        username = device_user(device_id, vhost)
        self._request("DELETE", f"/users/{quote(username, safe='')}", missing_ok=True)
        self.close_connections(username)
        if delete_queue:
            self._request("DELETE", f"/queues/{quote(vhost, safe='')}/{quote(device_queue(device_id), safe='')}",
                          missing_ok=True)

    def ensure_aggregator_user(self, username: str = AGGREGATOR_USER, password: str | None = None,
                               vhost: str = DEFAULT_VHOST, *, amqp_host: str = "127.0.0.1",
                               amqp_port: int = 5672) -> Credentials:
        """The aggregator's user: full rights on the vhost (it declares the topology, consumes the
        uplink, publishes downlink and dead letters), no management tag. Without `password` a new
        one is generated, which rotates it; pass the current one to keep it. Unlike device users this
        is an operator's user, global like any RabbitMQ user: give each vhost's aggregator its own
        `username` if one broker serves several deployments."""
        password = password or secrets.token_urlsafe(24)
        self.ensure_vhost(vhost)
        self._put_user(username, password, tags="")
        self._set_permissions(username, vhost, ".*", ".*", ".*")
        return Credentials(username, password, _amqp_url(username, password, amqp_host, amqp_port, vhost))

