"""Where the broker is and who a device is on it: `AmqpSettings` (URL, heartbeat, prefetch, namespace,
TLS), `AmqpError`, and the device id, queue and user names.

These are the pieces every other module of the package needs and that need no live connection; the
only pika use is building connection parameters (`AmqpSettings._parameters`), kept next to the TLS
settings it must not skip.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, fields
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

# pika ships no type hints; pyproject sets ignore_missing_imports, a bare `mypy --strict` does not.
import pika  # type: ignore[import-untyped, unused-ignore]

from shared.errors import ConfigError, FedMaskError

DEVICE_QUEUE_PREFIX: Final = "device."

# A device id is one routing-key word: a dot would split it (device.a.b.update never matches device.*.*)
# and would let the topic permission ^device\.a\. cover device a.b. Stricter than the codec's pattern.
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{0,64}")


# Environment variables for the TLS fields (the CLI's --amqp-ca, --amqp-cert, --amqp-key and
# --amqp-server-name set them), read by from_url for amqps:// URLs.
TLS_ENV: Final = {"ca_file": "FEDMASK_AMQP_CA", "cert_file": "FEDMASK_AMQP_CERT", "key_file": "FEDMASK_AMQP_KEY",
                  "server_hostname": "FEDMASK_AMQP_SERVER_NAME"}


class AmqpError(FedMaskError):
    """A RabbitMQ operation failed. `code` is the AMQP reply code when the broker gave one (403
    ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, 312 NO_ROUTE); `retryable` is True when
    the connection dropped and a reconnect may succeed."""

    def __init__(self, message: str, *, code: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


def validate_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise AmqpError(f"bad device id {device_id!r}: need 1..64 chars of [A-Za-z0-9_-] "
                        "(no dots: the id is one routing-key word)")
    return device_id


def device_queue(device_id: str, namespace: str = "") -> str:
    """The device's own downlink queue: device.<id>."""
    return f"{namespace}{DEVICE_QUEUE_PREFIX}{validate_device_id(device_id)}"


def vhost_user_prefix(vhost: str) -> str:
    """What every device user of `vhost` starts with: the vhost percent-escaped, then a dot.

    Escaping: every byte of the vhost's UTF-8 outside [A-Za-z0-9_.~-] becomes %XX (urllib's quote with
    no safe characters), so `%` itself is escaped and the escaped form is one-to-one. A device id never
    holds a dot, so the last dot of a user name splits it back into (vhost, device) unambiguously: two
    different (vhost, device) pairs can never name the same user."""
    return quote(vhost, safe="") + "."


def device_user(device_id: str, vhost: str) -> str:
    """The broker user enrolment creates for a device in `vhost`: <escaped vhost>.<id>, e.g.
    fedmask.subject-1 (vhost "/": %2F.subject-1). One user per (vhost, device): enrolling the same id
    in another vhost creates another user and never touches this one."""
    return vhost_user_prefix(vhost) + validate_device_id(device_id)


def device_of_user(user_id: str | None, vhost: str) -> str | None:
    """The device a broker-verified user_id speaks for on `vhost`, or None when the user is not a
    device user of this vhost (the aggregator, an admin, another vhost's device, no user_id at all):
    such a message names nobody, and the aggregator rejects it as spoofed_device."""
    prefix = vhost_user_prefix(vhost)
    if not user_id or not user_id.startswith(prefix):
        return None
    device_id = user_id[len(prefix):]
    return device_id if _DEVICE_ID_RE.fullmatch(device_id) else None


@dataclass(frozen=True)
class AmqpSettings:
    """Where the broker is and how to talk to it. `namespace` prefixes every exchange and queue name;
    it is empty in production and unique per test run so tests can share a vhost.

    TLS: an amqps:// URL (default port 5671) always verifies the broker's certificate chain and name.
    `ca_file` is the PEM bundle it must chain to (None: the system trust store); `cert_file` and
    `key_file` are a client certificate for brokers that require one (`key_file` may be omitted when
    `cert_file` holds both); `server_hostname` is the name checked against the certificate and sent as
    SNI (None: the URL's host). The TLS settings are refused with an amqp:// URL rather than ignored.
    """

    url: str = "amqp://guest:guest@127.0.0.1:5672/fedmask"
    heartbeat: int = 30
    prefetch: int = 16
    confirm_timeout: float = 30.0
    namespace: str = ""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        try:
            nodes = [urlsplit(u) for u in self.node_urls()]
            bad = parts.scheme not in ("amqp", "amqps") or not nodes or not all(n.hostname for n in nodes)
            bad = bad or any(n.port is not None and n.port <= 0 for n in nodes)  # .port raises for a bad port
        except ValueError:
            bad = True
        if bad:
            raise ConfigError(f"AMQP URL must be amqp[s]://user:password@host:port[,host:port...]/vhost, "
                              f"got {self.redacted()}")
        if not 0 <= self.heartbeat <= 600:
            raise ConfigError(f"heartbeat must be 0..600 s, got {self.heartbeat}")
        if not 1 <= self.prefetch <= 65535:
            raise ConfigError(f"prefetch must be 1..65535, got {self.prefetch}")
        if not self.confirm_timeout > 0:
            raise ConfigError(f"confirm_timeout must be > 0, got {self.confirm_timeout}")
        if not _NAMESPACE_RE.fullmatch(self.namespace):
            raise ConfigError(f"namespace must be 0..64 chars of [A-Za-z0-9_.-], got {self.namespace!r}")
        if "ssl_options" in parse_qs(parts.query):
            raise ConfigError(f"TLS is set with an amqps:// URL and the ca_file/cert_file/key_file settings, not "
                              f"the ssl_options URL argument: {self.redacted()}")
        tls_files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        given = [k for k, v in {**tls_files, "server_hostname": self.server_hostname}.items() if v is not None]
        if given and parts.scheme != "amqps":
            raise ConfigError(f"{', '.join(given)} need an amqps:// URL, got {self.redacted()}")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file needs cert_file (the client certificate it belongs to)")
        for what, path in tls_files.items():
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{what} {path!r} is not a file")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> AmqpSettings:
        """kw: any other field (heartbeat, namespace, ca_file, cert_file, key_file, server_hostname...).
        For an amqps:// URL, TLS fields not given come from the environment (TLS_ENV): one setting
        reaches every connection of a process and the processes it starts (`fedmask demo`, `make up`)."""
        if urlsplit(url).scheme == "amqps":
            for name, env in TLS_ENV.items():
                if kw.get(name) is None and os.environ.get(env):
                    kw[name] = os.environ[env]
        return cls(url=url, **kw)

    def node_urls(self) -> list[str]:
        """One URL per broker node. A clustered broker is named by listing its nodes in the URL's host
        part, amqp://user:pw@node1:5672,node2:5672,node3:5672/vhost (as libpq and MongoDB do);
        connections try them in that order, so a stopped node costs one refused connect."""
        parts = urlsplit(self.url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        prefix = userinfo + "@" if userinfo else ""
        return [urlunsplit(parts._replace(netloc=prefix + h.strip())) for h in hosts.split(",") if h.strip()]

    def address(self) -> str:
        """scheme://host:port[,host:port...]/vhost, without credentials: what an aggregator records
        for operators."""
        hosts = []
        for u in self.node_urls():
            parts = urlsplit(u)
            hosts.append(f"{parts.hostname or '127.0.0.1'}:{parts.port or (5671 if self.tls else 5672)}")
        return f"{urlsplit(self.url).scheme}://{','.join(hosts)}/{quote(self.vhost, safe='')}"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "amqps"

    def ssl_context(self) -> ssl.SSLContext | None:
        """For amqps:// (None for amqp://): TLS 1.2 or newer, the broker's certificate must chain to
        ca_file (or the system store when None) and match its name; the client certificate if set."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: an unreadable or non-PEM file
            raise ConfigError(f"TLS settings for {self.redacted()} are unusable: {type(exc).__name__}: {exc}") from None
        return context  # create_default_context: CERT_REQUIRED and check_hostname (tests/integration/test_tls.py)

    def __repr__(self) -> str:
        """The dataclass repr with the URL redacted (the generated one would print the password)."""
        shown = {f.name: self.redacted() if f.name == "url" else getattr(self, f.name) for f in fields(self)}
        return f"AmqpSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def username(self) -> str:
        return unquote(urlsplit(self.url).username or "guest")

    @property
    def vhost(self) -> str:
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    def redacted(self) -> str:
        """The URL with the password replaced by ***: the only form that goes into logs and errors."""
        try:
            parts = urlsplit(self.url)
            if parts.password is None:
                return self.url
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
        except ValueError:
            return "<unparseable AMQP URL>"

    def _parameters(self, name: str) -> list[Any]:
        """The one place connection parameters are built: every connection (publisher, consumer,
        admin channels) goes through _connect and here, so TLS cannot be skipped by one of them.
        One entry per node (node_urls); pika tries them in order."""
        out = []
        for url in self.node_urls():
            params = pika.URLParameters(url)
            context = self.ssl_context()
            params.ssl_options = None if context is None else pika.SSLOptions(context,
                                                                              self.server_hostname or params.host)
            params.heartbeat = self.heartbeat
            params.blocked_connection_timeout = 60.0  # a memory/disk alarm fails a publish instead of hanging it
            params.socket_timeout = 10.0
            params.connection_attempts = 1
            params.client_properties = {"connection_name": f"fedmask:{name}"}
            out.append(params)
        return out
