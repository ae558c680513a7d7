"""The aggregator's Redis ACL (broker_config/redis-acl.conf.template) against a real Redis.

A throwaway user gets the template's rules for fedmask-aggregator, with the key pattern narrowed from
~fm:* to a unique test prefix, and a generated password. As that user every RoundStore operation must
work (Lua scripts included: Redis checks the commands a script runs against the caller's grant), and
commands or keys outside the grant must be refused. The user and the prefix's keys are deleted after.

Destructive commands (FLUSHALL, FLUSHDB, CONFIG SET, SHUTDOWN...) are checked with ACL DRYRUN (Redis
7.0+), which runs the ACL check without the command: running them for real would wipe other tests'
data if the grant were ever too wide. Harmless ones (CONFIG GET, KEYS, EVAL, a key outside the prefix)
are really sent.
"""

from __future__ import annotations

import inspect
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from aggregator.store import RoundStore, StoreError
from aggregator.store_batch import BatchUpdate

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "broker_config" / "redis-acl.conf.template"
LUA_DIR = ROOT / "aggregator" / "lua"
T0 = 1_700_000_000.0
STRUCT = b"\xf0\x0f"

# Every public RoundStore method must be run as the restricted user below (or be listed here with why
# not): a new method using a command outside the grant then fails this file instead of production.
NOT_REDIS_OPS = {"from_url", "close", "set_closer", "closer_args"}  # the last two only set or read attributes


def template_rules(user: str = "fedmask-aggregator") -> list[str]:
    for line in TEMPLATE.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", user]:
            return words[2:]
    raise AssertionError(f"{TEMPLATE.name} has no line for user {user}")


def granted_commands(rules: list[str]) -> set[str]:
    """The +commands of an ACL rule list, lower case (subcommands as cmd|sub)."""
    return {r[1:].lower() for r in rules if r.startswith("+") and not r.startswith("+@")}


@dataclass
class AclUser:
    name: str
    password: str
    prefix: str
    url: str
    admin: redis.Redis


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.fixture
def acl_user(redis_service_url: str) -> Iterator[AclUser]:
    admin = redis.Redis.from_url(redis_service_url, socket_connect_timeout=5.0)
    name = f"fedmask-test-acl-{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(24)
    prefix = f"test:acl:{uuid.uuid4().hex}:"
    rules = template_rules()
    assert rules.count("~fm:*") == 1, f"expected exactly one key pattern ~fm:* in {TEMPLATE.name}: {rules}"
    assert not [r for r in rules if r.startswith(("~", "%", "allkeys", "&", "allchannels")) and r != "~fm:*"], rules
    test_rules = [">" + password if r.startswith(">") else f"~{prefix}*" if r == "~fm:*" else r for r in rules]
    try:
        admin.execute_command("ACL", "SETUSER", name, "reset", *test_rules)
    except redis.ResponseError as err:  # e.g. a provided URL whose user may not manage ACLs
        pytest.skip(f"cannot create a Redis ACL user with {redis_service_url}: {err}")
    try:
        yield AclUser(name, password, prefix, _with_credentials(redis_service_url, name, password), admin)
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        keys = list(admin.scan_iter(match=prefix + "*", count=500))
        if keys:
            admin.delete(*keys)
        admin.close()


def test_template_grants_every_command_the_lua_scripts_run() -> None:
    """Static half: Redis checks script commands against the caller's ACL, so every redis.call in
    aggregator/lua must be granted (the integration test below proves the Python side)."""
    used = set()
    for path in sorted(LUA_DIR.glob("*.lua")):
        used |= {c.lower() for c in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", path.read_text())}
    assert used, "no redis.call found in aggregator/lua: the pattern is stale"
    assert used - granted_commands(template_rules()) == set()


def test_every_store_operation_works_as_the_aggregator_user(acl_user: AclUser) -> None:
    s = RoundStore.from_url(acl_user.url, prefix=acl_user.prefix)
    called: set[str] = set()

    def call(name: str, *args: object, **kw: object) -> object:
        called.add(name)
        return getattr(s, name)(*args, **kw)

    try:
        with pytest.raises(redis.exceptions.NoPermissionError):  # really the restricted user
            s.client.execute_command("ACL", "WHOAMI")
        call("ping")
        assert call("ack_durability").verdict == "unverified"  # type: ignore[attr-defined]  # no CONFIG GET
        for d in ("d1", "d2", "d3", "d4"):
            call("register_device", d, profile="pi4", fingerprint="ab" * 8, structure=STRUCT, now=T0)
        assert call("device_ids") == ["d1", "d2", "d3", "d4"] and call("structure", "d1") == STRUCT
        call("touch", "d1", T0 + 5)
        assert call("alive", T0 + 1) == ["d1"]
        assert call("current_round") is None
        call("open_round", 1, sampled=["d1", "d2", "d3"], deadline=T0 + 60, quorum=3, now=T0, policy={"q": 0.6})
        call("mark_tasked", ["d1", "d2", "d3"], 1)
        assert call("ingest_update", 1, "d1", b"u1", T0 + 1) == ("stored", False)
        assert call("ingest_update", 1, "d1", b"u1", T0 + 1) == ("duplicate", False)
        call("mark_reported", "d1", 1)
        assert call("busy", ["d1", "d2", "d4"], 2, 2) == {"d2"}
        assert call("ingest_update", 1, "d2", b"u2", T0 + 2) == ("stored", False)  # 2 of 3
        assert call("try_close", 1, T0 + 60)  # the deadline
        assert call("rounds_in_state", "closing") == [1]
        call("mark_late", 1, "d3")
        assert call("set_pending", "d3", 1, b"late-3") == "parked"
        assert call("pending_devices") == {"d3"}
        assert call("updates", 1) == {"d1": b"u1", "d2": b"u2"}
        call("mark_closed", 1, T0 + 4)
        info = call("info", 1)
        assert info is not None and info.state == "closed" and info.late == ["d3"]  # type: ignore[attr-defined]
        call("set_masks", {"d1": b"\x01\x02"}, 1)
        assert call("mask", "d1") == (b"\x01\x02", 1) and call("mask_version", "d1") == 1
        call("open_round", 2, sampled=["d1", "d2"], deadline=T0 + 120, quorum=2, now=T0 + 5)
        assert call("pending") == [("d3", 1, b"late-3")]
        assert call("carry_pending", 2, "d3", 1, T0 + 6) == ("carried", 1)
        assert call("carry_update", 2, "d3", b"late-3", T0 + 6) == "duplicate"
        assert set(call("updates", 2)) == {"d3"}  # type: ignore[call-overload]  # carried, not in the quorum
        assert call("ingest_update", 2, "d1", b"u1-2", T0 + 7) == ("stored", False)
        assert call("ingest_update", 2, "d2", b"u2-2", T0 + 8) == ("stored", True)  # quorum 2: elected
        call("note_update", "d2", 2, "updates:stored")
        call("set_masks", {"d1": b"\x03", "d2": b"\x04"}, 2)
        assert call("mask", "d2") == (b"\x04", 2)
        assert call("held_masks", "d1") == {1: b"\x01\x02", 2: b"\x03"}  # the newest and the one before
        call("set_config", {"task": "digits", "width": "32"})
        assert call("config") == {"task": "digits", "width": "32"}
        call("incr", "updates:stored", 2)
        assert call("counters") == {"updates:stored": 3}
        # The device lifecycle (store_devices.py) and the close lease (store_closer.py).
        assert call("mark_unreachable", "d4", T0 + 9) and call("unreachable") == {"d4"}
        assert call("unreachable_count") == 1 and call("clear_unreachable", "d4")
        call("mark_closed", 2, T0 + 9)
        call("open_round", 3, sampled=["d1", "d2"], deadline=T0 + 180, quorum=2, now=T0 + 10)
        assert call("ingest_update", 3, "d1", b"u1-3", T0 + 11) == ("stored", False)
        assert call("remove_device", "d1", 3) == {"parked": 0, "stored": 1}
        # The batch path: a body SET under its own key and renamed in by the script (+rename +persist).
        batch = [BatchUpdate(3, "d2", b"u2-3", '{"loss": 0.5}'), BatchUpdate(3, "d1", b"again", "")]
        assert [(r.status, r.elected, r.error) for r in call("ingest_batch", batch, T0 + 12, {"rejected:x": 1})] == \
            [("stored", False, ""), ("removed", False, "")]
        assert call("structures", ["d2", "nobody"]) == {"d2": STRUCT, "nobody": None}
        assert call("is_removed", "d1") and call("removed") == {"d1"}
        call("readmit", "d1")
        assert call("claim_close", 3) and not call("claim_close", 3)
        call("renew_close", 3)
        assert call("closer_of", 3) == s.closer_args()[0]
        # redis-py reloads a script with SCRIPT LOAD after a SCRIPT FLUSH or a restart; flushing the
        # shared server's cache would disturb other tests, so run the reload path's commands directly.
        src = (LUA_DIR / "touch.lua").read_text()
        sha = s.client.script_load(src)
        assert s.client.script_exists(sha) == [True]
    finally:
        s.close()
    public = {n for n, v in inspect.getmembers(RoundStore, inspect.isfunction) if not n.startswith("_")}
    public |= {n for n, v in vars(RoundStore).items() if isinstance(v, classmethod) and not n.startswith("_")}
    assert public - NOT_REDIS_OPS - called == set(), "RoundStore operations not run under the ACL in this test"


def test_commands_and_keys_outside_the_grant_are_refused(acl_user: AclUser) -> None:
    s = RoundStore.from_url(acl_user.url, prefix=acl_user.prefix)
    outside = f"test:acl-outside:{uuid.uuid4().hex}"
    admin = acl_user.admin
    try:
        c = s.client
        # Sent for real: harmless even if they were allowed.
        for cmd in (("CONFIG", "GET", "maxmemory"), ("KEYS", acl_user.prefix + "*"), ("SCAN", "0"),
                    ("EVAL", "return 1", "0"), ("GET", outside), ("SET", outside, "x"),
                    ("PUBLISH", "fedmask-test", "x"), ("ACL", "LIST"), ("INFO",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*cmd)
        assert admin.exists(outside) == 0
        # A Lua script is checked too: the same store code pointed at keys outside the prefix.
        foreign = RoundStore(c, prefix=f"test:acl-outside:{uuid.uuid4().hex}:")
        with pytest.raises(StoreError, match="NoPermissionError"):
            foreign.register_device("d1", profile="pi4", fingerprint="ab" * 8, structure=STRUCT, now=T0)
        with pytest.raises(StoreError, match="NoPermissionError"):
            foreign.current_round()
        # Checked without running them (ACL DRYRUN, as the admin): what would wipe or reconfigure Redis.
        inside = acl_user.prefix + "x"
        assert admin.execute_command("ACL", "DRYRUN", acl_user.name, "GET", inside) in (b"OK", "OK")
        for cmd in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("SHUTDOWN",),
                    ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("DEL", outside), ("ACL", "SETUSER", "x"),
                    ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"), ("CLIENT", "KILL", "ID", "1")):
            verdict = admin.execute_command("ACL", "DRYRUN", acl_user.name, *cmd)
            assert verdict not in (b"OK", "OK"), f"{' '.join(cmd)} is allowed for the aggregator user"
    finally:
        s.close()
        admin.delete(outside)


def test_wrong_password_is_refused_without_leaking_it(acl_user: AclUser) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(12)
    s = RoundStore.from_url(acl_user.url.replace(acl_user.password, wrong), prefix=acl_user.prefix)
    try:
        with pytest.raises(StoreError) as caught:
            s.ping()
    finally:
        s.close()
    assert wrong not in str(caught.value) and acl_user.password not in str(caught.value)
