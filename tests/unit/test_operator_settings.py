"""Settings an operator never has to repeat: the broker the aggregator serves (from its record in
Redis), TLS files from flags or the environment, and service state found from any folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.redis_url import client_from_url
from ops.cli import main
from ops.control.rounds import DEFAULT_OPERATOR_AMQP, operator_amqp_url
from ops.services.deployment import default_run_dir
from shared.amqp import AmqpSettings
from shared.errors import ConfigError

RECORD = {"amqp_address": "amqp://10.0.0.5:5673/fleet-a", "task": "activity"}


def test_round_commands_use_the_broker_the_aggregator_serves() -> None:
    warnings: list[str] = []
    url = operator_amqp_url(None, RECORD, warn=warnings.append)
    assert url == "amqp://guest:guest@10.0.0.5:5673/fleet-a" and not warnings
    assert AmqpSettings.from_url(url).address() == RECORD["amqp_address"]
    assert operator_amqp_url(None, {}, warn=warnings.append) == DEFAULT_OPERATOR_AMQP  # an older aggregator
    same = operator_amqp_url("amqp://ops:pw@10.0.0.5:5673/fleet-a", RECORD, warn=warnings.append)
    assert same.startswith("amqp://ops:pw@") and not warnings
    other = operator_amqp_url("amqp://ops:pw@10.0.0.5:5673/fleet-b", RECORD, warn=warnings.append)
    assert other.endswith("/fleet-b"), "an explicit URL still wins"
    assert len(warnings) == 1 and "fleet-a" in warnings[0] and "pw" not in warnings[0]


def test_the_recorded_address_holds_no_credentials() -> None:
    s = AmqpSettings.from_url("amqp://fedmask-aggregator:s3cret@broker.lan/fedmask")
    assert s.address() == "amqp://broker.lan:5672/fedmask" and "s3cret" not in s.address()


def test_tls_files_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used before connecting")
    monkeypatch.setenv("FEDMASK_AMQP_CA", str(ca))
    monkeypatch.setenv("FEDMASK_AMQP_SERVER_NAME", "broker.lan")
    tls = AmqpSettings.from_url("amqps://u:p@10.0.0.5/fedmask")
    assert (tls.ca_file, tls.server_hostname) == (str(ca), "broker.lan")
    plain = AmqpSettings.from_url("amqp://u:p@127.0.0.1/fedmask")  # the variables only concern amqps://
    assert plain.ca_file is None and plain.server_hostname is None
    monkeypatch.setenv("FEDMASK_REDIS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        client_from_url("rediss://127.0.0.1:6380/0")
    client_from_url("redis://127.0.0.1:6380/0").close()  # plain redis:// ignores it


def test_tls_flags_set_the_environment_for_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("FEDMASK_REDIS_CA", "FEDMASK_REDIS_CERT"):
        monkeypatch.delenv(env, raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    try:
        out = CliRunner().invoke(main, ["round", "status", "--redis-url", "rediss://127.0.0.1:1/0",
                                        "--redis-ca", str(ca)])
        assert os.environ.get("FEDMASK_REDIS_CA") == str(ca)
        assert out.exit_code != 0  # nothing listens there; the point is that the flag reached the setting
    finally:
        os.environ.pop("FEDMASK_REDIS_CA", None)  # set by the command, not by monkeypatch: undo it here


def test_service_state_is_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_run_dir() == tmp_path / "state" / "fedmask" / "services"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_run_dir() == tmp_path / "home" / ".local" / "state" / "fedmask" / "services"
    monkeypatch.chdir(tmp_path)
    assert default_run_dir().is_absolute()


def test_a_clustered_broker_is_named_by_its_nodes() -> None:
    s = AmqpSettings.from_url("amqp://dev:pw@node1:5672,node2,node3:5673/fleet")
    assert s.node_urls() == ["amqp://dev:pw@node1:5672/fleet", "amqp://dev:pw@node2/fleet",
                             "amqp://dev:pw@node3:5673/fleet"]
    assert s.address() == "amqp://node1:5672,node2:5672,node3:5673/fleet"
    assert (s.username, s.vhost) == ("dev", "fleet") and "pw" not in s.redacted()
    assert [(p.host, p.port) for p in s._parameters("t")] == [("node1", 5672), ("node2", 5672), ("node3", 5673)]
    for bad in ("amqp://dev:pw@node1:5672,:5673/fleet", "amqp://dev:pw@node1:99999/fleet", "amqp://dev:pw@/fleet"):
        with pytest.raises(ConfigError, match="host:port"):
            AmqpSettings.from_url(bad)


def test_redis_behind_sentinel_is_named_by_its_sentinels() -> None:
    from aggregator.redis_url import redact_url, replicas_to_wait

    url = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/fedmask/2?replicas=1"
    assert replicas_to_wait(url) == 1 and replicas_to_wait("redis://h:6379/0") == 0
    client = client_from_url(url)  # nothing is contacted until the first command
    assert client.connection_pool.connection_kwargs["db"] == 2
    assert "s3cret" not in redact_url(url)
    for bad in ("redis+sentinel://10.0.0.1:26379/", "redis+sentinel://10.0.0.1:x/fedmask",
                "redis+sentinel://10.0.0.1/fedmask/db", "redis://h/0?replicas=many", "redis://h/0?replicas=99"):
        with pytest.raises(ConfigError):
            client_from_url(bad)
    with pytest.raises(ConfigError, match="Sentinel"):
        client_from_url("redis+sentinel://10.0.0.1:26379/fedmask", ca_file=__file__)
