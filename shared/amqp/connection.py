"""Connections and error translation: where pika's exceptions become `AmqpError`.

`_connect` is the one way the package opens a connection (so TLS and the other parameters of
`AmqpSettings` always apply) and `_amqp_errors` wraps every broker operation, so callers see the
project's own errors with a redacted URL. `open_channel` and `queue_depth` are the small
one-connection helpers built on them, for declarations, operators and tests.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.amqp.settings import AmqpError, AmqpSettings
from shared.amqp.untrusted import SafeSelectConnection

log = logging.getLogger("fedmask.amqp")

_BROKER_SAID: Final = re.compile(r'\(530\) "(NOT_ALLOWED - [^"]{0,200})"')
# Reply codes after which reconnecting cannot help (the same request would be refused again).
_REFUSED_CODES: Final = frozenset({402, 403, 404, 406, 530})


def _translate(exc: BaseException, what: str, where: str, *, retryable: bool | None = None) -> AmqpError:
    """One pika exception -> AmqpError; the message names the operation and where (a redacted URL)."""
    ex = pika.exceptions
    code: int | None = None
    if isinstance(exc, ex.UnroutableError):
        msg, code, retry = "message was returned unroutable (no queue bound for it)", 312, False
    elif isinstance(exc, ex.NackError):
        msg, retry = "broker nacked the message", False
    elif isinstance(exc, (ex.ChannelClosedByBroker, ex.ConnectionClosedByBroker)):
        code = int(exc.reply_code)
        closed = "channel" if isinstance(exc, ex.ChannelClosedByBroker) else "connection"
        msg = f"broker closed the {closed}: {code} {exc.reply_text}"
        retry = code not in _REFUSED_CODES
    elif isinstance(exc, (ex.ProbableAuthenticationError, ex.AuthenticationError)):
        msg, code, retry = "authentication failed (wrong user or password?)", 403, False
    elif isinstance(exc, ex.ProbableAccessDeniedError):
        # The broker's own words when it gave them: a per-user connection limit reads like a missing permission.
        said = _BROKER_SAID.search(str(exc))
        msg = (f"access refused: {said.group(1)}" if said
               else "access refused (does the user have permissions on this vhost?)")
        code, retry = 530, False
    elif isinstance(exc, ssl.SSLCertVerificationError):  # reconnecting meets the same certificate
        msg = f"TLS: the broker's certificate was refused ({exc.verify_message}); check ca_file and server_hostname"
        retry = False
    elif isinstance(exc, (ex.AMQPConnectionError, ex.ChannelWrongStateError, ex.ChannelClosed, OSError)):
        msg, retry = f"connection lost or unavailable ({type(exc).__name__}: {exc})", True
    else:
        msg, retry = f"{type(exc).__name__}: {exc}", False
    if retryable is not None:
        retry = retryable
    return AmqpError(f"{what} failed on {where}: {msg}", code=code, retryable=retry)


@contextmanager
def _amqp_errors(what: str, where: str, *, retryable: bool | None = None) -> Iterator[None]:
    try:
        yield
    except AmqpError:
        raise
    except (pika.exceptions.AMQPError, OSError) as e:
        raise _translate(e, what, where, retryable=retryable) from e


def _connect(settings: AmqpSettings, name: str) -> Any:
    """Every connection reads frames with SafeSelectConnection: a content header pika cannot decode
    becomes UndecodableProperties instead of a dropped connection (untrusted.py says why)."""
    with _amqp_errors(f"connect ({name})", settings.redacted()):
        return pika.BlockingConnection(settings._parameters(name), _impl_class=SafeSelectConnection)


def _close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:  # closing a broken connection: nothing left to save
        log.debug("error while closing a connection", exc_info=True)


@contextmanager
def open_channel(settings: AmqpSettings) -> Iterator[Any]:
    """A short-lived channel for declarations (declare_topology) and tests.
    pika errors raised inside the block come out as AmqpError."""
    connection = _connect(settings, "admin")
    try:
        with _amqp_errors("channel operation", settings.redacted()):
            yield connection.channel()
    finally:
        _close_quietly(connection)


def queue_depth(settings: AmqpSettings, queue: str) -> int:
    """Messages ready in `queue` (not counting unacked ones), by passive declare."""
    connection = _connect(settings, "queue-depth")
    try:
        with _amqp_errors(f"inspect queue {queue}", settings.redacted()):
            return int(connection.channel().queue_declare(queue=queue, passive=True).method.message_count)
    finally:
        _close_quietly(connection)


_MAX_SIZE_RE: Final = re.compile(r"larger than configured max size (\d+)")
SIZE_PROBE_KEY: Final = "fedmask.size-probe"  # bound to no queue: an accepted probe is dropped unrouted


def probe_max_message_size(settings: AmqpSettings, size: int) -> int | None:
    """The broker's max_message_size if it is below `size`, else None (a message of `size` bytes is
    accepted). No API reports the setting, so this publishes `size` zero bytes to the default exchange
    with a routing key no queue has: a broker whose limit is lower closes the channel with 406 and
    names its limit; otherwise the message is confirmed and dropped unrouted. Nothing is stored."""
    connection = _connect(settings, "size-probe")
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            channel.basic_publish("", SIZE_PROBE_KEY, bytes(size))
        except pika.exceptions.ChannelClosedByBroker as e:
            m = _MAX_SIZE_RE.search(str(e.reply_text))
            if e.reply_code == 406 and m:
                return int(m.group(1))
            raise _translate(e, "probe max message size", settings.redacted()) from e
        return None
    except (pika.exceptions.AMQPError, OSError) as e:
        raise _translate(e, "probe max message size", settings.redacted()) from e
    finally:
        _close_quietly(connection)
