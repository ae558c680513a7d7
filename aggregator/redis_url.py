"""From a Redis URL to a redis-py client, and the URL fit for a log line.

Kept apart from RoundStore because this is where TLS is decided: rediss:// always verifies the
server, and nothing in the URL's query string may weaken that.
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Final
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
