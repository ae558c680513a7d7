"""RabbitMQ adapter: the only module in the project that imports pika.

Everything pika raises is translated into `AmqpError` here, so callers see the project's own errors.

Topology (vhost fedmask; every name below is `settings.namespace + NAME`, and the namespace is empty
outside tests):
  fedmask.uplink    topic exchange   devices publish device.<id>.<kind> with user_id = their own user
  aggregator.uplink quorum queue     bound to device.*.*; dead-letters to fedmask.dead
  fedmask.downlink  direct exchange  routing key <id> -> queue device.<id> (classic, dead-letters too)
  fedmask.dead      fanout exchange  -> dead.letters

Threading. pika is not thread-safe. `Publisher` serialises its callers with a lock. `Consumer` keeps
its connection in the thread that calls `run` and calls the handler in one worker thread, so a
handler that trains for minutes never starves heartbeats; the handler's `Outcome` is settled back on
the connection thread through `add_callback_threadsafe`, and only if the delivery's connection is
still the live one (a tag from a dead connection is dropped: the broker has already requeued it).

Dead letters. A rejected delivery must reach dead.letters once, with a machine-readable reason, and
leave the source queue. RabbitMQ's own dead-lettering cannot add headers, so the consumer channel
runs in AMQP transaction mode and a reject is `publish(fedmask.dead, headers x-reject-reason=...)`
plus `ack(original)` committed together: if the connection drops before the commit neither happens
and the broker redelivers the original, so a client crash can neither lose the message nor
dead-letter it twice. Acks and requeues are committed the same way, in batches: whatever settled
while the previous commit was in flight goes into the next one.
A device's consumer cannot write to fedmask.dead (its permissions allow fedmask.uplink only), so on
device queues a reject is a plain `nack(requeue=False)`: the queue's x-dead-letter-exchange moves it
to dead.letters with RabbitMQ's x-death headers (reason "rejected"), and the reason is logged.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue as queue_mod
import re
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

# pika ships no type hints; pyproject sets ignore_missing_imports, a bare `mypy --strict` does not.
import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.errors import ConfigError, FedMaskError

log = logging.getLogger("fedmask.amqp")

UPLINK_EXCHANGE: Final = "fedmask.uplink"
DOWNLINK_EXCHANGE: Final = "fedmask.downlink"
DEAD_EXCHANGE: Final = "fedmask.dead"
AGGREGATOR_QUEUE: Final = "aggregator.uplink"
DEAD_QUEUE: Final = "dead.letters"
DEVICE_QUEUE_PREFIX: Final = "device."
DEVICE_USER_PREFIX: Final = "device-"  # enrolment names a device's broker user device-<id>
UPLINK_BINDING: Final = "device.*.*"

REASON_HEADER: Final = "x-reject-reason"
MAX_REASON_CHARS: Final = 256
_MAX_UNCOMMITTED: Final = 64  # settlements per transaction at most (bounded by prefetch in practice)
CONTENT_TYPE: Final = "application/msgpack"

# A device id is one routing-key word: a dot would split it (device.a.b.update never matches device.*.*)
# and would let the topic permission ^device\.a\. cover device a.b. Stricter than the codec's pattern.
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{0,64}")

# Reply codes after which reconnecting cannot help (the same request would be refused again).
_REFUSED_CODES: Final = frozenset({402, 403, 404, 406, 530})


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


def device_user(device_id: str) -> str:
    """The broker user enrolment creates for a device: device-<id>."""
    return f"{DEVICE_USER_PREFIX}{validate_device_id(device_id)}"


# --------------------------------------------------------------------------------------------- settings


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
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigError(f"AMQP URL must be amqp[s]://user:password@host:port/vhost, got {self.redacted()}")
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
        """kw: any other field (heartbeat, namespace, ca_file, cert_file, key_file, server_hostname...)."""
        return cls(url=url, **kw)

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

    def _parameters(self, name: str) -> Any:
        """The one place connection parameters are built: every connection (publisher, consumer,
        admin channels) goes through _connect and here, so TLS cannot be skipped by one of them."""
        params = pika.URLParameters(self.url)
        context = self.ssl_context()
        params.ssl_options = None if context is None else pika.SSLOptions(context, self.server_hostname or params.host)
        params.heartbeat = self.heartbeat
        params.blocked_connection_timeout = 60.0  # a memory/disk alarm fails a publish instead of hanging it
        params.socket_timeout = 10.0
        params.connection_attempts = 1
        params.client_properties = {"connection_name": f"fedmask:{name}"}
        return params


# ------------------------------------------------------------------------------------------------ errors


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
        msg, code, retry = "access refused (does the user have permissions on this vhost?)", 530, False
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
    with _amqp_errors(f"connect ({name})", settings.redacted()):
        return pika.BlockingConnection(settings._parameters(name))


def _close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:  # closing a broken connection: nothing left to save
        log.debug("error while closing a connection", exc_info=True)


# ---------------------------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: Literal["topic", "direct", "fanout"]


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    """The topology as data: declared over AMQP here, over the management HTTP API by ops/enroll.py,
    and written out in broker_config/definitions.json (a test checks the three agree)."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()


def topology(namespace: str = "") -> Topology:
    ns = namespace
    return Topology(
        exchanges=(
            ExchangeSpec(ns + UPLINK_EXCHANGE, "topic"),
            ExchangeSpec(ns + DOWNLINK_EXCHANGE, "direct"),
            ExchangeSpec(ns + DEAD_EXCHANGE, "fanout"),
        ),
        queues=(
            QueueSpec(ns + AGGREGATOR_QUEUE, {"x-queue-type": "quorum", "x-dead-letter-exchange": ns + DEAD_EXCHANGE}),
            QueueSpec(ns + DEAD_QUEUE, {}),
        ),
        bindings=(
            BindingSpec(ns + UPLINK_EXCHANGE, ns + AGGREGATOR_QUEUE, UPLINK_BINDING),
            BindingSpec(ns + DEAD_EXCHANGE, ns + DEAD_QUEUE, ""),
        ),
    )


def device_topology(device_id: str, namespace: str = "") -> Topology:
    """A device's queue (classic: one per device, quorum queues would cost a Raft group each) and its
    downlink binding; rejected tasks dead-letter like uplink messages do."""
    q = device_queue(device_id, namespace)
    return Topology(
        queues=(QueueSpec(q, {"x-dead-letter-exchange": namespace + DEAD_EXCHANGE}),),
        bindings=(BindingSpec(namespace + DOWNLINK_EXCHANGE, q, device_id),),
    )


def _declare(channel: Any, topo: Topology) -> None:
    for ex in topo.exchanges:
        channel.exchange_declare(exchange=ex.name, exchange_type=ex.type, durable=True)
    for q in topo.queues:
        channel.queue_declare(queue=q.name, durable=True, arguments=dict(q.arguments))
    for b in topo.bindings:
        channel.queue_bind(queue=b.queue, exchange=b.exchange, routing_key=b.routing_key)


def declare_topology(channel: Any, *, namespace: str = "") -> None:
    """Idempotent: exchanges, the aggregator's quorum queue with its dead-letter exchange, dead.letters."""
    with _amqp_errors("declare topology", "the given channel"):
        _declare(channel, topology(namespace))


def declare_device_queue(channel: Any, device_id: str, *, namespace: str = "") -> None:
    """Idempotent: durable queue device.<id> bound to the downlink exchange with routing key <id>."""
    with _amqp_errors(f"declare queue for device {device_id}", "the given channel"):
        _declare(channel, device_topology(device_id, namespace))


# --------------------------------------------------------------------------------------------- publisher


class _ConfirmTimeout(Exception):
    pass


class Publisher:
    """Blocking publisher with publisher confirms, mandatory routing and persistent messages.

    `publish_*` returns once the broker has confirmed the message (it is then in every queue it was
    routed to). A nack, an unroutable message, a refused publish (403/406) or a missing confirm after
    `settings.confirm_timeout` raise AmqpError. A dropped connection is reconnected once, after a
    short backoff, before raising; a message whose confirm was lost with the connection is published
    again, so delivery is at least once (the aggregator stores updates idempotently). Thread-safe: a
    lock serialises callers. Satisfies shared.transport.Transport.
    """

    RETRY_DELAY: Final = 1.0

    def __init__(self, settings: AmqpSettings, *, declare: bool = False) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        with self._lock:
            try:
                channel = self._ensure_channel()
                if declare:
                    declare_topology(channel, namespace=settings.namespace)
            except BaseException:
                self._discard()
                raise

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def publish_uplink(self, device_id: str, kind: str, body: bytes, *, user_id: str | None = None) -> None:
        """Routing key device.<id>.<kind>. user_id defaults to this connection's user, which RabbitMQ
        checks: a device can only ever publish as itself."""
        validate_device_id(device_id)
        if not _KIND_RE.fullmatch(kind):
            raise AmqpError(f"bad message kind {kind!r}")
        props = self._properties(user_id=user_id or self.settings.username, kind=kind)
        self._publish(self.settings.namespace + UPLINK_EXCHANGE, f"device.{device_id}.{kind}", body, props)

    def publish_downlink(self, device_id: str, body: bytes, *, headers: dict[str, Any] | None = None) -> None:
        """To the device's own queue; unroutable (no such device queue) raises AmqpError."""
        validate_device_id(device_id)
        props = self._properties(user_id=self.settings.username, headers=headers)
        self._publish(self.settings.namespace + DOWNLINK_EXCHANGE, device_id, body, props)

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _properties(self, *, user_id: str, kind: str | None = None, headers: dict[str, Any] | None = None) -> Any:
        return pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
            type=kind,
            app_id="fedmask",
            user_id=user_id,
            headers=dict(headers) if headers else None,
        )

    def _discard(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        _close_quietly(connection)

    def _ensure_channel(self) -> Any:
        if self._connection is not None and self._connection.is_open:
            try:
                # An idle BlockingConnection sends no heartbeats; this answers the broker and notices a
                # close it already sent, so we reconnect before publishing rather than after.
                self._connection.process_data_events(0)
            except (pika.exceptions.AMQPError, OSError):
                self._discard()
        if self._connection is None or not self._connection.is_open:
            self._discard()
            self._connection = _connect(self.settings, "publisher")
        if self._channel is None or not self._channel.is_open:
            with _amqp_errors("open channel", self.settings.redacted()):
                channel = self._connection.channel()
                channel.confirm_delivery()
            self._channel = channel
        return self._channel

    def _publish(self, exchange: str, routing_key: str, body: bytes, props: Any) -> None:
        what = f"publish to {exchange} with key {routing_key}"
        with self._lock:
            for attempt in (1, 2):
                try:
                    channel = self._ensure_channel()
                    self._confirmed_publish(channel, exchange, routing_key, body, props)
                    return
                except _ConfirmTimeout:
                    self._discard()
                    raise AmqpError(
                        f"{what} failed on {self.settings.redacted()}: no publisher confirm within "
                        f"{self.settings.confirm_timeout:g} s (the message may or may not have been stored)"
                    ) from None
                except AmqpError as e:
                    err, cause = e, e.__cause__
                except (pika.exceptions.AMQPError, OSError) as e:
                    err, cause = _translate(e, what, self.settings.redacted()), e
                if isinstance(cause, pika.exceptions.ChannelClosedByBroker):
                    self._channel = None  # the connection survives a refused publish; the channel does not
                if not err.retryable:
                    raise err from cause
                self._discard()
                if attempt == 1:
                    log.warning("%s; reconnecting in %.1f s", err, self.RETRY_DELAY)
                    time.sleep(self.RETRY_DELAY)
                    continue
                raise err from cause

    def _confirmed_publish(self, channel: Any, exchange: str, routing_key: str, body: bytes, props: Any) -> None:
        # pika's blocking confirm wait has no timeout of its own. An ioloop timer (pika's internal
        # SelectConnection, reached through _impl) closes the connection, which ends the wait.
        impl = self._connection._impl
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            impl.close(200, "publisher confirm timeout")

        timer = impl.ioloop.call_later(self.settings.confirm_timeout, expire)
        try:
            channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
        except Exception:
            if fired:
                raise _ConfirmTimeout() from None
            raise
        finally:
            if not fired:
                impl.ioloop.remove_timeout(timer)
        if fired:  # the close raced the confirm; the message was confirmed but the connection is gone
            self._discard()


# ---------------------------------------------------------------------------------------------- consumer


@dataclass(frozen=True)
class Delivery:
    routing_key: str
    user_id: str | None  # message property, validated by the broker
    body: bytes
    headers: dict[str, Any]
    redelivered: bool
    delivery_tag: int


@dataclass(frozen=True)
class Outcome:
    """What the consumer does with a delivery: ack it, reject it to dead.letters with a reason
    (a short machine-readable code, at most 256 chars), or requeue it for another try."""

    action: Literal["ack", "reject", "requeue"]
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action not in ("ack", "reject", "requeue"):
            raise ValueError(f"unknown outcome {self.action!r}")
        if self.action == "reject" and not self.reason:
            raise ValueError("a reject needs a reason")

    @staticmethod
    def ack() -> Outcome:
        return Outcome("ack")

    @staticmethod
    def reject(reason: str) -> Outcome:
        return Outcome("reject", reason[:MAX_REASON_CHARS])

    @staticmethod
    def requeue() -> Outcome:
        return Outcome("requeue")


@dataclass(eq=False)
class _Link:
    """One live connection of a consumer. `open` goes False, on the connection thread, before the
    connection is closed or abandoned; outcomes for its deliveries are then dropped."""

    connection: Any
    channel: Any
    open: bool = True
    accepting: bool = True  # False while draining: queued deliveries are left for redelivery
    uncommitted: int = 0  # settlements sent but not yet committed (connection thread only)


@dataclass(frozen=True)
class _Work:
    link: _Link
    delivery: Delivery
    exchange: str
    properties: Any


class _Cancelled(Exception):
    pass


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


DeadLetterMode = Literal["auto", "republish", "native"]


class Consumer:
    """Consume one queue with manual acks; see the module docstring for threading and dead letters.

    handler(delivery) -> Outcome runs in one worker thread, one delivery at a time, in delivery order.
    A handler that raises is retried (requeued after `requeue_delay`) and rejected with reason
    "handler_error" on its `max_attempts`-th failure; attempts are counted in process and, on quorum
    queues, from the broker's x-delivery-count. `dead_letter`: "republish" (reason header, needs
    write permission on fedmask.dead), "native" (nack without requeue), "auto" (native on device
    queues, republish elsewhere).
    """

    def __init__(
        self,
        settings: AmqpSettings,
        queue: str,
        handler: Callable[[Delivery], Outcome],
        *,
        prefetch: int | None = None,
        dead_letter: DeadLetterMode = "auto",
        max_attempts: int = 5,
        requeue_delay: float = 1.0,
        stop_grace: float = 30.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch if prefetch is not None else settings.prefetch
        if dead_letter == "auto":
            dead_letter = "native" if queue.startswith(settings.namespace + DEVICE_QUEUE_PREFIX) else "republish"
        self.dead_letter: DeadLetterMode = dead_letter
        self.max_attempts = max_attempts
        self.requeue_delay = requeue_delay
        self.stop_grace = stop_grace
        self.max_backoff = max_backoff
        self.connections = 0  # successful connect+consume cycles; >1 means it reconnected
        self.error: AmqpError | None = None  # set when start_in_thread's run ended on a fatal error
        self._work: queue_mod.Queue[_Work | None] = queue_mod.Queue()
        self._link: _Link | None = None
        self._ready = threading.Event()
        self._busy = threading.Event()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._consumed = False

    # -- lifecycle

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set. Reconnects with exponential backoff (capped at max_backoff) when
        the connection drops; raises AmqpError when the broker refuses the consumer outright (bad
        credentials, no read permission, no such queue)."""
        worker = threading.Thread(target=self._work_loop, args=(stop,), name=f"amqp-handler:{self.queue}", daemon=True)
        worker.start()
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    self._serve(stop)
                    continue  # graceful: stop is set
                except AmqpError as e:
                    if not e.retryable:
                        raise
                    problem, trace = str(e), False
                except Exception as e:  # a bug must not kill the service's only consumer
                    problem, trace = f"unexpected {type(e).__name__}: {e}", True
                if self._consumed:
                    backoff = 0.5  # it worked for a while: start the backoff over
                log.warning("consumer of %s: %s; reconnecting in %.1f s", self.queue, problem, backoff, exc_info=trace)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        finally:
            self._work.put(None)
            worker.join(timeout=self.stop_grace)

    def start_in_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError("consumer already started")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_capturing, args=(self._stop,),
                                        name=f"amqp-consumer:{self.queue}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once consuming has started; raises the fatal error if the consumer gave up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if self._ready.wait(0.05):
                return True
        return False

    def stop(self, timeout: float | None = None) -> None:
        """Stop a consumer started with start_in_thread: finish the delivery in hand, settle it, close."""
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout if timeout is not None else self.stop_grace + 5)
        self._thread, self._stop = None, None

    def _run_capturing(self, stop: threading.Event) -> None:
        try:
            self.run(stop)
        except AmqpError as e:
            self.error = e
            log.error("consumer of %s gave up: %s", self.queue, e)

    # -- connection thread

    def _serve(self, stop: threading.Event) -> None:
        """One connection's life: returns after a graceful stop, raises AmqpError otherwise."""
        self._consumed = False
        connection = _connect(self.settings, f"consumer:{self.queue}")
        link: _Link | None = None
        try:
            with _amqp_errors(f"consume {self.queue}", self.settings.redacted()):
                channel = connection.channel()
                channel.basic_qos(prefetch_count=self.prefetch)
                channel.tx_select()
                link = _Link(connection, channel)
                channel.add_on_cancel_callback(self._on_cancel)
                channel.basic_consume(self.queue, functools.partial(self._on_message, link), auto_ack=False)
            self._link = link
            self._consumed = True
            self.connections += 1
            self._ready.set()
            log.info("consuming %s on %s (prefetch %d)", self.queue, self.settings.redacted(), self.prefetch)
            # From here on every failure is the connection's, whatever the reply code (406 is also how
            # RabbitMQ reports consumer_timeout): reconnect.
            with _amqp_errors(f"consume {self.queue}", self.settings.redacted(), retryable=True):
                while not stop.is_set():
                    connection.process_data_events(time_limit=0.25)
                self._drain(link)
        except _Cancelled:
            raise AmqpError(f"consumer of {self.queue} was cancelled by the broker (queue deleted?)",
                            retryable=True) from None
        finally:
            self._ready.clear()
            if link is not None:
                link.open = False
                link.accepting = False
            self._link = None
            _close_quietly(connection)

    def _drain(self, link: _Link) -> None:
        """Graceful stop: no new deliveries, let the one in hand finish and settle, leave the rest
        unacked (closing the channel returns them to the queue)."""
        link.accepting = False
        for tag in list(link.channel.consumer_tags):
            link.channel.basic_cancel(tag)
        deadline = time.monotonic() + self.stop_grace
        while (self._busy.is_set() or self._pending) and time.monotonic() < deadline:
            link.connection.process_data_events(time_limit=0.05)

    def _on_cancel(self, _frame: Any) -> None:
        raise _Cancelled()

    def _on_message(self, link: _Link, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = Delivery(
            routing_key=method.routing_key,
            user_id=properties.user_id,
            body=body,
            headers=_plain(properties.headers or {}),
            redelivered=bool(method.redelivered),
            delivery_tag=int(method.delivery_tag),
        )
        self._work.put(_Work(link, delivery, method.exchange, properties))

    def _settle(self, work: _Work, outcome: Outcome) -> None:
        """Runs on the connection thread. Settlements are committed in batches: the commit is sent
        when no other settlement is waiting (or after _MAX_UNCOMMITTED). A batch is still all or
        nothing, and every update it acks was persisted before its Outcome existed; if the connection
        drops before the commit, the broker redelivers the batch and the idempotent store acks the
        repeats. One commit per message cost a broker round trip each (docs/results.md)."""
        link = work.link
        tag = work.delivery.delivery_tag
        try:
            if link is not self._link or not link.open or not link.channel.is_open:
                log.info("dropped the %s of delivery %d: its connection is gone, the broker redelivers it",
                         outcome.action, tag)
                return
            channel = link.channel
            if outcome.action == "ack":
                channel.basic_ack(tag)
            elif outcome.action == "requeue":
                channel.basic_nack(tag, requeue=True)
            elif self.dead_letter == "republish":
                channel.basic_publish(self.settings.namespace + DEAD_EXCHANGE, work.delivery.routing_key,
                                      work.delivery.body, self._dead_properties(work, outcome.reason))
                channel.basic_ack(tag)
            else:
                log.warning("rejected delivery %s from %s: %s", work.delivery.routing_key, self.queue, outcome.reason)
                channel.basic_nack(tag, requeue=False)
            link.uncommitted += 1
        finally:
            with self._pending_lock:
                self._pending -= 1
                last = self._pending == 0
        if link.uncommitted and (last or link.uncommitted >= _MAX_UNCOMMITTED) and link.channel.is_open:
            link.channel.tx_commit()
            link.uncommitted = 0

    def _dead_properties(self, work: _Work, reason: str) -> Any:
        p = work.properties
        headers = dict(p.headers or {})
        headers.update({
            REASON_HEADER: reason[:MAX_REASON_CHARS],
            "x-original-exchange": work.exchange,
            "x-original-routing-key": work.delivery.routing_key,
            "x-original-queue": self.queue,
            "x-rejected-by": self.settings.username,
            "x-rejected-at": int(time.time()),
        })
        if p.user_id:
            headers["x-original-user-id"] = p.user_id
        # user_id is dropped: the property must equal the publishing connection's user, which is now ours.
        return pika.BasicProperties(
            content_type=p.content_type, content_encoding=p.content_encoding, message_id=p.message_id,
            correlation_id=p.correlation_id, timestamp=p.timestamp, type=p.type, app_id=p.app_id,
            delivery_mode=pika.DeliveryMode.Persistent, headers=headers,
        )

    # -- worker thread

    def _work_loop(self, stop: threading.Event) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            self._busy.set()  # before the accepting check, so a drain never misses a delivery in hand
            try:
                if not (work.link.open and work.link.accepting):
                    continue  # from a dead or draining connection: the broker redelivers it
                outcome = self._call_handler(work.delivery)
                if outcome.action == "requeue" and self.requeue_delay > 0:
                    stop.wait(self.requeue_delay)  # an immediate requeue would spin on a failing dependency
                self._schedule(work, outcome)
            finally:
                self._busy.clear()

    def _call_handler(self, delivery: Delivery) -> Outcome:
        try:
            outcome = self.handler(delivery)
            if not isinstance(outcome, Outcome):
                raise TypeError(f"handler returned {type(outcome).__name__}, not Outcome")
            return outcome
        except Exception as e:
            key = hashlib.sha256(delivery.routing_key.encode() + b"\0" + delivery.body).hexdigest()
            attempts = self._failures.pop(key, 0) + 1
            count = delivery.headers.get("x-delivery-count")
            if isinstance(count, int):
                attempts = max(attempts, count + 1)
            if attempts >= self.max_attempts:
                log.exception("handler failed on %s (attempt %d): rejecting", delivery.routing_key, attempts)
                return Outcome.reject("handler_error")
            self._failures[key] = attempts
            while len(self._failures) > 1024:
                self._failures.popitem(last=False)
            log.warning("handler failed on %s (attempt %d of %d): %s: %s; requeueing", delivery.routing_key,
                        attempts, self.max_attempts, type(e).__name__, e)
            return Outcome.requeue()

    def _schedule(self, work: _Work, outcome: Outcome) -> None:
        link = work.link
        if not link.open:
            log.info("dropped the %s of delivery %d: its connection is gone, the broker redelivers it",
                     outcome.action, work.delivery.delivery_tag)
            return
        with self._pending_lock:
            self._pending += 1
        try:
            link.connection.add_callback_threadsafe(functools.partial(self._settle, work, outcome))
        except (pika.exceptions.AMQPError, OSError):
            with self._pending_lock:
                self._pending -= 1
            log.info("dropped the %s of delivery %d: its connection closed, the broker redelivers it",
                     outcome.action, work.delivery.delivery_tag)


# ------------------------------------------------------------------------------------------ test helpers


@contextmanager
def open_channel(settings: AmqpSettings) -> Iterator[Any]:
    """A short-lived channel for declarations (declare_topology, declare_device_queue) and tests.
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


def purge(settings: AmqpSettings, queue: str) -> None:
    connection = _connect(settings, "purge")
    try:
        with _amqp_errors(f"purge queue {queue}", settings.redacted()):
            connection.channel().queue_purge(queue=queue)
    finally:
        _close_quietly(connection)


def delete_topology(settings: AmqpSettings, *, device_ids: tuple[str, ...] = ()) -> None:
    """Delete the (namespaced) queues and exchanges, messages included: test teardown only."""
    ns = settings.namespace
    topo = topology(ns)
    queues = [q.name for q in topo.queues] + [device_queue(d, ns) for d in device_ids]
    connection = _connect(settings, "teardown")
    try:
        with _amqp_errors("delete topology", settings.redacted()):
            channel = connection.channel()
            for name in queues:
                channel.queue_delete(queue=name)
            for ex in topo.exchanges:
                channel.exchange_delete(exchange=ex.name)
    finally:
        _close_quietly(connection)
