"""Passwords in AMQP and Redis URLs never reach a log line, an exception message or a repr.

Each test uses a distinctive password (with a character that must be percent-encoded in the URL, so
both the encoded and the decoded form are looked for) and an endpoint that fails: a refused port
(no service needed) or the real broker/Redis refusing an unknown user. Everything logged at DEBUG by
any logger (pika and redis-py included) is captured, and each error is checked with its whole
formatted chain (what a log.exception would print). Every test also asserts that something *was*
logged or raised about the failure, so an empty capture cannot pass vacuously.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import traceback
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from aggregator.store import RoundStore, StoreError, redact_url
from shared.amqp import AmqpError, AmqpSettings, Consumer, Outcome, Publisher
from shared.errors import ConfigError

PLAIN = "Pw" + secrets.token_hex(10)
PASSWORD = PLAIN + "/+x"  # decoded form; the URL carries quote(PASSWORD, safe="")
IN_URL = quote(PASSWORD, safe="")
FORMS = (PLAIN, PASSWORD, IN_URL)


def _refused_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_user(url: str, user: str) -> str:
    u = urlsplit(url)
    host = u.netloc.rsplit("@", 1)[-1]
    return urlunsplit(u._replace(netloc=f"{user}:{IN_URL}@{host}"))


def _text_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def assert_clean(caplog: pytest.LogCaptureFixture, *errors: BaseException) -> None:
    texts = [caplog.text] + [_text_of(e) for e in errors]
    for r in caplog.records:
        texts += [r.getMessage(), repr(r.args), r.exc_text or ""]
        if r.exc_info and r.exc_info[1] is not None:
            texts.append(_text_of(r.exc_info[1]))
    for form in FORMS:
        leaks = [t for t in texts if form in t]
        assert not leaks, f"password ({form!r}) leaked: {leaks[0][:500]}"


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    for name in ("pika", "redis", "fedmask", "fedmask.amqp"):  # some entry points quiet pika: undo it here
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


# --------------------------------------------------------------------------------------------- RabbitMQ


@pytest.mark.parametrize("scheme", ["amqp", "amqps"])
def test_publisher_to_a_refused_endpoint(capture: pytest.LogCaptureFixture, scheme: str) -> None:
    settings = AmqpSettings.from_url(f"{scheme}://fedmask-test:{IN_URL}@127.0.0.1:{_refused_port()}/fedmask")
    assert settings.redacted() == f"{scheme}://fedmask-test:***@127.0.0.1:{urlsplit(settings.url).port}/fedmask"
    with pytest.raises(AmqpError) as caught:
        Publisher(settings)
    assert "***" in str(caught.value) and caught.value.retryable
    assert capture.records, "nothing was logged: the check below would be vacuous"
    assert_clean(capture, caught.value)
    for text in (repr(settings), str(settings)):
        assert all(form not in text for form in FORMS), text


def test_consumer_retrying_a_refused_endpoint(capture: pytest.LogCaptureFixture) -> None:
    settings = AmqpSettings.from_url(f"amqp://fedmask-test:{IN_URL}@127.0.0.1:{_refused_port()}/fedmask")
    consumer = Consumer(settings, "fedmask-test.never", lambda d: Outcome.ack(), max_backoff=0.2)
    consumer.start_in_thread()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum("reconnecting" in r.getMessage() for r in capture.records) < 2:
        time.sleep(0.05)
    consumer.stop()
    warnings = [r for r in capture.records if "reconnecting" in r.getMessage()]
    assert len(warnings) >= 2 and "***" in warnings[0].getMessage()
    assert_clean(capture)


def test_configuration_errors(capture: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []
    for url, kw in ((f"http://u:{IN_URL}@h/", {}), (f"amqp://u:{IN_URL}@h/", {"heartbeat": -1}),
                    (f"amqp://u:{IN_URL}@h/", {"ca_file": "/nonexistent/ca.pem"}),
                    (f"amqps://u:{IN_URL}@h/", {"ca_file": "/nonexistent/ca.pem"}),
                    (f"amqp://u:{IN_URL}@h/?ssl_options=None", {})):
        with pytest.raises(ConfigError) as caught:
            AmqpSettings.from_url(url, **kw)
        errors.append(caught.value)
    for url, kw in ((f"http://u:{IN_URL}@h/0", {}), (f"redis://u:{IN_URL}@h/0", {"ca_file": "/nonexistent"}),
                    (f"rediss://u:{IN_URL}@h/0?ssl_cert_reqs=none", {})):
        with pytest.raises(ConfigError) as caught:
            RoundStore.from_url(url, **kw)
        errors.append(caught.value)
    assert_clean(capture, *errors)
    assert redact_url(f"redis://u:{IN_URL}@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.services
def test_unknown_user_on_the_real_broker(capture: pytest.LogCaptureFixture, amqp_service_url: str) -> None:
    settings = AmqpSettings.from_url(_with_user(amqp_service_url, f"fedmask-nobody-{secrets.token_hex(4)}"))
    with pytest.raises(AmqpError) as caught:
        Publisher(settings)
    assert caught.value.code == 403 and not caught.value.retryable
    consumer = Consumer(settings, "fedmask-test.never", lambda d: Outcome.ack())
    consumer.start_in_thread()
    try:
        with pytest.raises(AmqpError) as refused:
            consumer.wait_ready(10)  # an authentication failure is fatal: the consumer gives up and says why
    finally:
        consumer.stop()
    assert any("gave up" in r.getMessage() for r in capture.records)
    assert_clean(capture, caught.value, refused.value)


# ------------------------------------------------------------------------------------------------ Redis


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_round_store_to_a_refused_endpoint(capture: pytest.LogCaptureFixture, scheme: str) -> None:
    s = RoundStore.from_url(f"{scheme}://fedmask-test:{IN_URL}@127.0.0.1:{_refused_port()}/0", prefix="creds:")
    errors = []
    try:
        for op in (s.ping, lambda: s.ingest_update(1, "d1", b"x", 0.0), s.counters):
            with pytest.raises(StoreError) as caught:
                op()
            assert "refused" in str(caught.value).lower() or "connect" in str(caught.value).lower()
            errors.append(caught.value)
    finally:
        s.close()
    assert_clean(capture, *errors)
    assert all(form not in repr(s.client) for form in FORMS)


@pytest.mark.services
def test_round_store_with_a_wrong_password(capture: pytest.LogCaptureFixture, redis_service_url: str) -> None:
    s = RoundStore.from_url(_with_user(redis_service_url, f"fedmask-nobody-{secrets.token_hex(4)}"), prefix="creds:")
    errors = []
    try:
        for op in (s.ping, s.current_round):
            with pytest.raises(StoreError, match=r"(?i)auth|password|WRONGPASS") as caught:
                op()
            errors.append(caught.value)
    finally:
        s.close()
    assert_clean(capture, *errors)


def test_assert_clean_catches_a_leak(caplog: pytest.LogCaptureFixture) -> None:
    """The checker itself: a password in a log line, in an exception's cause or in a log record's
    traceback is found."""
    caplog.set_level(logging.DEBUG)
    logging.getLogger("fedmask.test").warning("connecting to amqp://u:%s@h/", IN_URL)
    with pytest.raises(AssertionError, match="leaked"):
        assert_clean(caplog)
    caplog.clear()
    try:
        try:
            raise OSError(f"bad password {PASSWORD}")
        except OSError as inner:
            raise StoreError("redis ping failed") from inner
    except StoreError as outer:
        with pytest.raises(AssertionError, match="leaked"):
            assert_clean(caplog, outer)
        logging.getLogger("fedmask.test").error("failed", exc_info=outer)
    with pytest.raises(AssertionError, match="leaked"):
        assert_clean(caplog)
