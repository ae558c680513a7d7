"""From a Redis URL to a redis-py client, and the URL fit for a log line.

Kept apart from RoundStore because this is where TLS is decided: rediss:// always verifies the
server, and nothing in the URL's query string may weaken that.

Redis with replicas and Sentinel: redis+sentinel://[user:password@]host:port[,host:port...]/<master>[/db]
names the Sentinels (not Redis itself) and the monitored master's name; the client asks them where
the master is and asks again after a failover. The password is Redis's; Sentinels are reached
without one. `?replicas=N` (any scheme) makes every stored update wait until N replicas hold it
before the aggregator acks it (Redis WAIT): a failover then loses no acknowledged update.
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

import redis

from shared.errors import ConfigError


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparseable redis url>"


TLS_ENV: Final = {"ca_file": "FEDMASK_REDIS_CA", "cert_file": "FEDMASK_REDIS_CERT", "key_file": "FEDMASK_REDIS_KEY"}


SENTINEL_SCHEME: Final = "redis+sentinel"


def replicas_to_wait(url: str) -> int:
    """The URL's `replicas` query value (0 when absent)."""
    try:
        values = parse_qs(urlsplit(url).query).get("replicas", ["0"])
        n = int(values[-1])
    except ValueError:
        raise ConfigError(f"bad Redis URL {redact_url(url)}: replicas must be a whole number") from None
    if not 0 <= n <= 16:
        raise ConfigError(f"bad Redis URL {redact_url(url)}: replicas must be 0..16, got {n}")
    return n


def _without_query_key(url: str, key: str) -> str:
    parts = urlsplit(url)
    kept = "&".join(kv for kv in parts.query.split("&") if kv and kv.split("=", 1)[0] != key)
    return parts._replace(query=kept).geturl()


def _sentinel_client(url: str) -> redis.Redis:
    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    try:
        sentinels = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) if ":" in h else 26379)
                     for h in hosts.split(",") if h]
    except ValueError:
        raise ConfigError(f"bad Redis URL {redact_url(url)}: Sentinels are host:port[,host:port...]") from None
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"bad Redis URL {redact_url(url)}: expected "
                          f"{SENTINEL_SCHEME}://host:port[,host:port...]/<master-name>[/<db>]")
    # redis-py types Sentinel from 8.2 on and not before: through Any, both type-check the same.
    sentinel: Any = cast(Any, Sentinel)(sentinels, socket_connect_timeout=5.0, socket_timeout=5.0)
    master: redis.Redis = sentinel.master_for(
        path[0], db=int(path[1]) if len(path) == 2 else 0, decode_responses=False, socket_connect_timeout=5.0,
        socket_timeout=30.0, username=parts.username or None, password=parts.password or None)
    return master


def client_from_url(url: str, *, ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> redis.Redis:
    """A client (decode_responses=False, as RoundStore needs) for redis:// or rediss://; see
    RoundStore.from_url for the TLS rules. Every mistake is a ConfigError that never shows the password."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(url)}: {exc}") from None
    if any(name.startswith("ssl") for name in query):
        raise ConfigError(f"bad Redis URL {redact_url(url)}: TLS options go in from_url's arguments, not the URL")
    replicas_to_wait(url)  # checked here, applied by RoundStore
    url = _without_query_key(url, "replicas")
    if parts.scheme == SENTINEL_SCHEME:
        if ca_file or cert_file or key_file:
            raise ConfigError("TLS to Redis through Sentinel is not supported yet: use rediss:// to one server")
        return _sentinel_client(url)
    if parts.scheme == "rediss":  # not given: from the environment (the CLI's --redis-ca etc. set it)
        ca_file = ca_file or os.environ.get(TLS_ENV["ca_file"]) or None
        cert_file = cert_file or os.environ.get(TLS_ENV["cert_file"]) or None
        key_file = key_file or os.environ.get(TLS_ENV["key_file"]) or None
    tls_files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    given = [what for what, path in tls_files.items() if path is not None]
    if given and parts.scheme != "rediss":
        raise ConfigError(f"{', '.join(given)} need a rediss:// URL, got {redact_url(url)}")
    if key_file is not None and cert_file is None:
        raise ConfigError("key_file needs cert_file (the client certificate it belongs to)")
    for what, path in tls_files.items():
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{what} {path!r} is not a file")
    tls: dict[str, Any] = {}
    if parts.scheme == "rediss":
        tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": ca_file,
               "ssl_certfile": cert_file, "ssl_keyfile": key_file, "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    try:
        return redis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=5.0,
                                    socket_timeout=30.0, **tls)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(url)}: {exc}") from None
