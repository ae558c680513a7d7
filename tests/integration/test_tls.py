"""TLS to RabbitMQ (amqps://) and Redis (rediss://) with a throwaway CA made here by openssl.

Redis: a second redis-server (this test's own, on a free port, TLS only, password from a 0600 config
file) with a certificate for DNS:localhost only, so one server shows both halves of verification: the
chain (right CA / no CA / wrong CA) and the name (localhost matches, 127.0.0.1 does not).

RabbitMQ: the broker under test has no TLS listener and is not reconfigured. `TlsProxy` terminates
TLS on 127.0.0.1:<free port> with a certificate for localhost and 127.0.0.1 and forwards the plain
bytes to the broker, so the client side (shared.amqp's SSLContext, verification, client certificates)
is exercised for real while the broker stays as it is. A second proxy requires a client certificate.

Skips (with the reason, under CI too): no openssl, or a redis-server without TLS support. Neither is a
service the project needs to run; Redis and RabbitMQ themselves come from the usual fixtures, which
fail under CI=true when absent.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from aggregator.store import RoundStore, StoreError
from shared.amqp import (
    AGGREGATOR_QUEUE,
    AmqpError,
    AmqpSettings,
    Consumer,
    Delivery,
    Outcome,
    Publisher,
    delete_topology,
)
from shared.errors import ConfigError

T0 = 1_700_000_000.0
SECRET = "tls-" + secrets.token_hex(8)  # a password that must never show up in an error


# --------------------------------------------------------------------------------------------- the CA


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA every good certificate chains to
    wrong_ca: Path  # an unrelated CA
    server_cert: Path  # DNS:localhost, IP:127.0.0.1 (the AMQP proxy)
    server_key: Path
    localhost_cert: Path  # DNS:localhost only (the Redis server)
    localhost_key: Path
    client_cert: Path  # clientAuth, for the proxy that requires one
    client_key: Path
    garbage: Path  # not PEM


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ec_key_args(key: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", *_ec_key_args(f"{name}.key"), "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=fedmask test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _issue(d: Path, name: str, *, san: str | None, usage: str) -> None:
    _openssl("req", "-new", *_ec_key_args(f"{name}.key"), "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
           f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
    if san:
        ext.append(f"subjectAltName={san}")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the TLS tests make their throwaway CA with it")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "wrong-ca")
    _issue(d, "server", san="DNS:localhost,IP:127.0.0.1", usage="serverAuth")
    _issue(d, "localhost", san="DNS:localhost", usage="serverAuth")
    _issue(d, "client", san=None, usage="clientAuth")
    (d / "garbage.pem").write_text("this is not a certificate\n")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(ca=d / "ca.pem", wrong_ca=d / "wrong-ca.pem", server_cert=d / "server.pem",
               server_key=d / "server.key", localhost_cert=d / "localhost.pem", localhost_key=d / "localhost.key",
               client_cert=d / "client.pem", client_key=d / "client.key", garbage=d / "garbage.pem")


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


# -------------------------------------------------------------------------------------- the TLS proxy


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


@dataclass
class TlsProxy:
    """TLS on 127.0.0.1:<port> -> plain TCP to `upstream`; an asyncio loop in a daemon thread.
    `sessions` counts connections whose TLS handshake completed (each was then forwarded)."""

    upstream: tuple[str, int]
    context: ssl.SSLContext
    port: int = 0
    sessions: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> TlsProxy:
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()

    async def _start(self) -> None:
        # Failed handshakes (the wrong-CA tests) are the point here, not news: keep them out of the log.
        self._loop.set_exception_handler(lambda _loop, _ctx: None)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context,
                                                  ssl_handshake_timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()
            self._tasks.discard(task)


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _amqps_url(plain_url: str, port: int, *, host: str = "localhost", password: str | None = None) -> str:
    """The fixture's URL (user, password, vhost) pointed at the proxy over amqps://."""
    u = urlsplit(plain_url)
    user = u.username or "guest"
    pw = password if password is not None else (u.password or "guest")
    return urlunsplit(u._replace(scheme="amqps", netloc=f"{user}:{pw}@{host}:{port}"))


def _no_secret(err: BaseException) -> None:
    assert SECRET not in str(err) and SECRET not in repr(err)


# ------------------------------------------------------------------------------------ configuration


def test_amqp_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    url = f"amqps://u:{SECRET}@localhost:5671/fedmask"
    s = AmqpSettings.from_url(url, ca_file=str(pki.ca), server_hostname="broker.example")
    ctx = s.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    [params] = s._parameters("t")
    assert params.ssl_options.context is not None and params.ssl_options.server_hostname == "broker.example"
    assert params.port == 5671
    assert AmqpSettings.from_url(url)._parameters("t")[0].ssl_options.server_hostname == "localhost"
    assert AmqpSettings.from_url("amqp://u:p@localhost/").ssl_context() is None
    assert AmqpSettings.from_url("amqp://u:p@localhost/")._parameters("t")[0].ssl_options is None
    # A cluster: every node gets the same TLS settings, its own host name checked.
    nodes = AmqpSettings.from_url(f"amqps://u:{SECRET}@node1:5671,node2:5672/fedmask", ca_file=str(pki.ca))
    assert [(p.host, p.port, p.ssl_options.server_hostname) for p in nodes._parameters("t")] == \
        [("node1", 5671, "node1"), ("node2", 5672, "node2")]
    assert SECRET not in repr(s)
    bad: list[tuple[str, dict[str, Any]]] = [
        (f"amqp://u:{SECRET}@localhost/", {"ca_file": str(pki.ca)}),  # TLS settings on a plain URL: not ignored
        (f"amqp://u:{SECRET}@localhost/", {"server_hostname": "x"}),
        (f"amqps://u:{SECRET}@localhost/", {"ca_file": str(tmp_path / "missing.pem")}),
        (f"amqps://u:{SECRET}@localhost/", {"key_file": str(pki.client_key)}),  # a key without its certificate
        (f"amqp://u:{SECRET}@localhost/?ssl_options={{'cafile':'x'}}", {}),
        (f"amqps://u:{SECRET}@localhost/?ssl_options=None", {}),
    ]
    for bad_url, kw in bad:
        with pytest.raises(ConfigError) as caught:
            AmqpSettings.from_url(bad_url, **kw)
        _no_secret(caught.value)
    with pytest.raises(ConfigError, match="unusable") as caught:
        AmqpSettings.from_url(url, ca_file=str(pki.garbage)).ssl_context()
    _no_secret(caught.value)


def test_redis_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    s = RoundStore.from_url(f"rediss://:{SECRET}@localhost:1/0", prefix="t:", ca_file=str(pki.ca))
    kw = s.client.connection_pool.connection_kwargs
    assert (kw["ssl_cert_reqs"], kw["ssl_check_hostname"], kw["ssl_ca_certs"]) == ("required", True, str(pki.ca))
    s.close()
    bad: list[tuple[str, dict[str, Any]]] = [
        (f"redis://:{SECRET}@localhost/0", {"ca_file": str(pki.ca)}),  # TLS settings on a plain URL
        (f"rediss://:{SECRET}@localhost/0?ssl_cert_reqs=none", {}),  # redis-py would let this win
        (f"rediss://:{SECRET}@localhost/0?ssl_check_hostname=false", {"ca_file": str(pki.ca)}),
        (f"rediss://:{SECRET}@localhost/0", {"ca_file": str(tmp_path / "missing.pem")}),
        (f"rediss://:{SECRET}@localhost/0", {"key_file": str(pki.client_key)}),
    ]
    for url, kwargs in bad:
        with pytest.raises(ConfigError) as caught:
            RoundStore.from_url(url, **kwargs)
        _no_secret(caught.value)


# ------------------------------------------------------------------------------------------------ Redis


@dataclass(frozen=True)
class TlsRedis:
    port: int
    password: str = field(repr=False)

    def url(self, host: str = "localhost", *, scheme: str = "rediss") -> str:
        return f"{scheme}://:{self.password}@{host}:{self.port}/0"


def _tls_handshake_error(port: int, ca: Path) -> str | None:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost"):
            return None
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed here: the rediss:// test starts its own TLS instance")
    d = tmp_path_factory.mktemp("redis-tls")
    password = SECRET  # so the failing connections below also show that the password never leaks
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = _free_port()
        conf = d / "redis.conf"
        conf.write_text("\n".join([
            "port 0", f"tls-port {port}", "bind 127.0.0.1", f"tls-cert-file {pki.localhost_cert}",
            f"tls-key-file {pki.localhost_key}", f"tls-ca-cert-file {pki.ca}", "tls-auth-clients no",
            f"requirepass {password}", 'save ""', "appendonly no", f"dir {d}", "loglevel warning",
        ]) + "\n")
        conf.chmod(0o600)
        log_path = d / "redis.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([exe, str(conf)], stdout=log, stderr=subprocess.STDOUT)

        def listening(p: int = port, proc: subprocess.Popen[bytes] = proc) -> bool:
            if proc.poll() is not None:
                return True
            try:
                socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
                return True
            except OSError:
                return False

        _wait_until(listening, timeout=10)
        if proc.poll() is None:
            break
        out = log_path.read_text()
        if "Address already in use" in out:
            continue
        if "tls" in out.lower():
            pytest.skip(f"{exe} cannot serve TLS (built without BUILD_TLS=yes?): {out.strip()[-300:]}")
        pytest.fail(f"redis-server exited at startup: {out[-1000:]}")
    else:
        pytest.fail("could not find a free port for the TLS redis-server")
    try:
        problem = _tls_handshake_error(port, pki.ca) if proc.poll() is None else "exited"
        if problem is not None:
            pytest.skip(f"{exe} does not complete a TLS handshake on --tls-port ({problem}): "
                        f"built without TLS? {log_path.read_text()[-300:]}")
        yield TlsRedis(port, password)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.services
def test_round_store_over_rediss_with_the_ca(pki: Pki, tls_redis: TlsRedis) -> None:
    s = RoundStore.from_url(tls_redis.url("localhost"), prefix=f"tls:{uuid.uuid4().hex}:", ca_file=str(pki.ca))
    try:
        s.ping()
        s.register_device("d1", profile="pi4", fingerprint="ab" * 8, structure=b"\xf0", now=T0)
        s.open_round(1, sampled=["d1"], deadline=T0 + 60, quorum=1, now=T0)
        assert s.ingest_update(1, "d1", b"update over TLS", T0 + 1) == ("stored", True)  # quorum 1: elected
        assert s.updates(1) == {"d1": b"update over TLS"}
        conn = s.client.connection_pool.get_connection()
        try:
            assert isinstance(conn._sock, ssl.SSLSocket) and conn._sock.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            s.client.connection_pool.release(conn)
    finally:
        s.close()


@pytest.mark.services
def test_rediss_refuses_a_server_it_cannot_verify(pki: Pki, tls_redis: TlsRedis) -> None:
    cases = [
        ("no CA (system trust store)", tls_redis.url("localhost"), None, "certificate verify failed"),
        ("wrong CA", tls_redis.url("localhost"), str(pki.wrong_ca), "certificate verify failed"),
        ("name not in the certificate", tls_redis.url("127.0.0.1"), str(pki.ca), "mismatch"),
        ("plain redis:// to the TLS port", tls_redis.url("localhost", scheme="redis"), None, "StoreError|Error"),
    ]
    for what, url, ca, expected in cases:
        s = RoundStore.from_url(url, prefix="tls:", ca_file=ca)
        try:
            with pytest.raises(StoreError, match=expected) as caught:
                s.ping()
        finally:
            s.close()
        _no_secret(caught.value)
        assert caught.value.__cause__ is None, what


# --------------------------------------------------------------------------------------------- RabbitMQ


@pytest.fixture
def broker(amqp_service_url: str) -> tuple[str, int]:
    u = urlsplit(amqp_service_url)
    if u.scheme != "amqp":
        pytest.skip(f"the TLS proxy forwards to a plain amqp:// broker; the fixture gave {u.scheme}://")
    return (u.hostname or "127.0.0.1", u.port or 5672)


def _consume_one(settings: AmqpSettings, body: bytes) -> list[Delivery]:
    got: list[Delivery] = []

    def handler(d: Delivery) -> Outcome:
        got.append(d)
        return Outcome.ack()

    with Publisher(settings, declare=True) as pub:
        consumer = Consumer(settings, settings.namespace + AGGREGATOR_QUEUE, handler)
        consumer.start_in_thread()
        try:
            assert consumer.wait_ready(10), "consumer did not start over TLS"
            pub.publish_uplink("dev-1", "update", body)
            assert _wait_until(lambda: len(got) >= 1, 10), "message did not come back over TLS"
        finally:
            consumer.stop()
    return got


@pytest.mark.services
def test_publisher_and_consumer_round_trip_over_amqps(pki: Pki, amqp_service_url: str,
                                                      broker: tuple[str, int]) -> None:
    ns = f"test-tls-{uuid.uuid4().hex[:10]}."
    with TlsProxy(broker, server_context(pki.server_cert, pki.server_key)) as proxy:
        settings = AmqpSettings.from_url(_amqps_url(amqp_service_url, proxy.port), ca_file=str(pki.ca), namespace=ns,
                                         heartbeat=5)
        try:
            got = _consume_one(settings, b"over TLS")
        finally:
            delete_topology(AmqpSettings.from_url(amqp_service_url, namespace=ns))
        assert [(d.body, d.routing_key, d.user_id) for d in got] == [(b"over TLS", "device.dev-1.update",
                                                                       settings.username)]
        assert proxy.sessions >= 2  # publisher and consumer both came through the TLS listener


@pytest.mark.services
def test_client_certificate_is_presented_when_the_broker_requires_one(pki: Pki, amqp_service_url: str,
                                                                     broker: tuple[str, int]) -> None:
    ns = f"test-tls-{uuid.uuid4().hex[:10]}."
    with TlsProxy(broker, server_context(pki.server_cert, pki.server_key, client_ca=pki.ca)) as proxy:
        url = _amqps_url(amqp_service_url, proxy.port)
        with_cert = AmqpSettings.from_url(url, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                                          key_file=str(pki.client_key), namespace=ns)
        try:
            with Publisher(with_cert, declare=True) as pub:
                pub.publish_uplink("dev-1", "update", b"mutual TLS")
        finally:
            delete_topology(AmqpSettings.from_url(amqp_service_url, namespace=ns))
        sessions = proxy.sessions
        without = AmqpSettings.from_url(_amqps_url(amqp_service_url, proxy.port, password=SECRET),
                                        ca_file=str(pki.ca), namespace=ns)
        with pytest.raises(AmqpError) as caught:
            Publisher(without)
        _no_secret(caught.value)
        assert proxy.sessions == sessions  # the proxy refused the handshake: nothing was forwarded


@pytest.mark.services
def test_amqps_refuses_a_broker_it_cannot_verify(pki: Pki, amqp_service_url: str, broker: tuple[str, int]) -> None:
    with TlsProxy(broker, server_context(pki.server_cert, pki.server_key)) as proxy:
        url = _amqps_url(amqp_service_url, proxy.port, password=SECRET)
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("wrong CA", {"ca_file": str(pki.wrong_ca)}, "unable to get local issuer certificate"),
            ("no CA (system trust store)", {}, "unable to get local issuer certificate"),
            ("name not in the certificate", {"ca_file": str(pki.ca), "server_hostname": "broker.example"},
             "mismatch"),
        ]
        for what, kw, expected in cases:
            settings = AmqpSettings.from_url(url, **kw)
            with pytest.raises(AmqpError, match="certificate was refused") as caught:
                Publisher(settings)
            assert expected in str(caught.value), what
            assert not caught.value.retryable, f"{what}: reconnecting cannot fix a certificate"
            _no_secret(caught.value)
        # A consumer gives up at once rather than retrying forever against a broker it cannot trust.
        consumer = Consumer(AmqpSettings.from_url(url, ca_file=str(pki.wrong_ca)), AGGREGATOR_QUEUE,
                            lambda d: Outcome.ack())
        consumer.start_in_thread()
        try:
            with pytest.raises(AmqpError, match="certificate was refused") as caught:
                consumer.wait_ready(10)
        finally:
            consumer.stop()
        _no_secret(caught.value)
        assert proxy.sessions == 0  # no handshake completed: nothing reached the broker

