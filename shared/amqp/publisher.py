"""`Publisher`: confirmed, mandatory, persistent publishes of device uplinks and aggregator downlinks.

pika is not thread-safe, so `Publisher` serialises its callers with a lock; it is the project's
`shared.transport.Transport`. `CONTENT_TYPE` is the content type every message carries.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Final

import pika  # type: ignore[import-untyped, unused-ignore]
import pika.exceptions  # type: ignore[import-untyped, unused-ignore]

from shared.amqp.broker_topology import DOWNLINK_EXCHANGE, UPLINK_EXCHANGE, declare_topology
from shared.amqp.connection import _amqp_errors, _close_quietly, _connect, _translate
from shared.amqp.settings import AmqpError, AmqpSettings, validate_device_id
from shared.transport import DeviceUnreachable

log = logging.getLogger("fedmask.amqp")

CONTENT_TYPE: Final = "application/msgpack"

_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


NO_ROUTE: Final = 312  # AMQP reply code of a mandatory message that no queue took


class _ConfirmTimeout(Exception):
    pass


class Publisher:
    """Blocking publisher with publisher confirms, mandatory routing and persistent messages.

    `publish_*` returns once the broker has confirmed the message (it is then in every queue it was
    routed to). A nack (a full queue that rejects publishes) is retried every NACK_RETRY_INTERVAL
    for up to NACK_RETRY_SECONDS. A nack after that, an unroutable message, a refused publish
    (403/406) or a missing confirm after `settings.confirm_timeout` raise AmqpError. A dropped
    connection is reconnected once, after a short backoff, before raising; a message whose confirm
    was lost with the connection is published again, so delivery is at least once (the aggregator
    stores updates idempotently). Thread-safe: a lock serialises callers. Satisfies
    shared.transport.Transport.
    """

    RETRY_DELAY: Final = 1.0
    NACK_RETRY_SECONDS: Final = 120.0  # how long a nacked publish (a full queue) is retried ...
    NACK_RETRY_INTERVAL: Final = 0.02  # ... and how often (see _publish)

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
        """To the device's own queue. Unroutable (no such device queue: a removed or reset board) raises
        DeviceUnreachable, which the round logic survives; any other failure raises AmqpError."""
        validate_device_id(device_id)
        props = self._properties(user_id=self.settings.username, headers=headers)
        try:
            self._publish(self.settings.namespace + DOWNLINK_EXCHANGE, device_id, body, props)
        except AmqpError as err:
            if err.code == NO_ROUTE:
                raise DeviceUnreachable(device_id, "its queue is gone (the message came back unroutable)") from err
            raise

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
            attempt, nack_deadline, nacks = 1, time.monotonic() + self.NACK_RETRY_SECONDS, 0
            while True:
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
                except pika.exceptions.NackError as e:
                    # A full queue with x-overflow reject-publish nacks (aggregator.uplink, when a board
                    # floods it). A quorum queue that hit its limit accepts again only once its consumer
                    # has brought it below 80% of the limit, and a flooder fills that window within
                    # a fraction of a second: a publisher that backs off misses it for the whole flood
                    # (measured: 58 s for a 60 s flood). So the retry interval stays short.
                    nacks += 1
                    if time.monotonic() + self.NACK_RETRY_INTERVAL > nack_deadline:
                        raise _translate(e, f"{what} (nacked {nacks} times in {self.NACK_RETRY_SECONDS:g} s)",
                                         self.settings.redacted()) from e
                    if nacks == 1:
                        log.warning("%s: nacked (queue full?); retrying for up to %.0f s", what,
                                    self.NACK_RETRY_SECONDS)
                    time.sleep(self.NACK_RETRY_INTERVAL)
                    continue
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
                    attempt = 2
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
