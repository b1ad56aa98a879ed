"""Every Lua script touches only the keys it is given in KEYS, and those share one hash slot.

Redis Cluster routes a script by its KEYS and a cluster client checks their slots; a key a
script builds itself (a prefix in ARGV and an id) is invisible to both. Two proofs:

- statically, for every file of ``routing/lua``: each ``redis.call`` names its keys as
  ``KEYS[...]`` or through a local bound only to ``KEYS[...]``; nothing built with ``..`` or
  taken from ARGV;
- on a real Redis, under MONITOR (which shows each command a script runs, right after the
  EVALSHA that ran it): the lane store's operations, on a lane of one shard and a lane of four,
  and every key each script's commands touched is one of that call's KEYS; all of a call's KEYS
  share one slot (``submit_one`` aside: it spans a tenant's and a lane's slot on purpose and is
  used only on a single Redis node).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from routing.errors import LaneFull
from routing.keys import Keys
from routing.models import ErrorInfo, Route, ServiceConfig, StoredResult
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.scripts import script_sources
from tests.test_sharding import with_hot_lanes
from tests.test_store import LANE_SCRIPTS, make, walk_deliveries

BOOM = ErrorInfo(code="server_error", message="upstream 503", retryable=True, status_code=503)

#: Commands whose every argument is a key; ``TIME`` has none; every other one used by a script
#: names one key, its first argument (asserted: an unknown command fails the test).
_ALL_KEYS = {"DEL", "EXISTS", "UNLINK", "MGET", "TOUCH"}
_NO_KEYS = {"TIME"}
_ONE_KEY = {
    "ZADD", "ZREM", "ZSCORE", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", "ZCOUNT", "ZREMRANGEBYSCORE",
    "HSET", "HGET", "HDEL", "HINCRBY", "HINCRBYFLOAT", "HEXISTS", "HSETNX", "HGETALL", "HMGET",
    "HLEN", "HVALS", "SET", "GET", "EXPIRE", "PEXPIRE", "PTTL", "TTL", "RPUSH", "LPUSH", "LTRIM",
    "LRANGE", "LLEN", "SADD", "SREM", "SISMEMBER", "SMEMBERS", "SCARD", "XADD", "INCR", "INCRBY",
    "INCRBYFLOAT",
}  # fmt: skip

_CALL = re.compile(r"redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+(?:\([^)]*\))?[^,)]*))?")
_KEY_EXPR = re.compile(r"^KEYS\[(?:(?!\.\.).)+\]$")
_FOR_KEYS = re.compile(r"for\s+[\w\s,]*?(\w+)\s+in\s+ipairs\(KEYS\)")
_ASSIGN = re.compile(r"^\s*(?:local\s+)?([\w\s,]+?)\s*=\s*(.+)$")


def _split_top(text: str) -> list[str]:
    """A Lua expression list split at its top-level commas."""
    out, depth, part = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(part.strip())
            part = ""
        else:
            part += ch
    out.append(part.strip())
    return out


def _bindings(source: str) -> dict[str, list[str]]:
    """Every expression each name is assigned, over the whole script."""
    bound: dict[str, list[str]] = {}
    for line in source.splitlines():
        m = _ASSIGN.match(line.split("--", 1)[0])
        if not m or "==" in line.split("=", 1)[0] + "=" + line.split("=", 1)[1][:1]:
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        values = _split_top(m.group(2))
        for name, value in zip(names, values, strict=False):
            bound.setdefault(name, []).append(value)
    for name in _FOR_KEYS.findall(source):  # for i, key in ipairs(KEYS): key is one of KEYS
        bound.setdefault(name, []).append("KEYS[i]")
    return bound


def _key_problems(name: str, source: str) -> list[str]:
    bound = _bindings(source)
    problems = []
    for command, first in _CALL.findall(source):
        command = command.upper()
        if command in _NO_KEYS:
            continue
        assert command in _ONE_KEY | _ALL_KEYS, f"{name}.lua: teach this test {command}'s keys"
        expr = first.strip()
        if _KEY_EXPR.match(expr):
            continue
        origins = bound.get(expr, [])
        if origins and all(_KEY_EXPR.match(o) for o in origins):
            continue
        problems.append(f"{name}.lua: {command} on {expr!r} (bound to {origins or 'nothing'})")
    return problems


def test_every_script_names_its_keys_from_KEYS_only() -> None:
    problems = [p for name, src in script_sources().items() for p in _key_problems(name, src)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "bad",
    [
        "redis.call('HGET', ARGV[5] .. id, 'state')",
        "local req = ARGV[2] .. id\nredis.call('EXISTS', req)",
        "local key = KEYS[1] .. ':x'\nredis.call('DEL', key)",
    ],
)
def test_the_static_check_catches_a_key_built_in_the_script(bad: str) -> None:
    assert _key_problems("bad", bad)


# -- on a real Redis, under MONITOR ------------------------------------------------------------

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"')
_END = "mb-monitor-end"


class Recorder:
    """MONITOR on its own connection, in a thread, until the end marker is echoed."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.lines: list[tuple[str, list[str]]] = []
        self._conn = self.client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            raw = self._conn.read_response()
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            source = text.split("[", 1)[1].split("]", 1)[0].split(" ", 1)[1]
            tokens = _TOKEN.findall(text)
            self.lines.append(("lua" if source == "lua" else "client", tokens))
            if tokens[:2] == ["echo", _END] or tokens[:2] == ["ECHO", _END]:
                return

    def stop(self) -> list[tuple[str, list[str]]]:
        self.client.echo(_END)
        self._thread.join(timeout=30)
        self._conn.disconnect()
        self.client.close()
        return self.lines


def _touched(tokens: list[str]) -> list[str]:
    command = tokens[0].upper()
    if command in _NO_KEYS:
        return []
    assert command in _ONE_KEY | _ALL_KEYS, f"teach this test {command}'s keys"
    return tokens[1:] if command in _ALL_KEYS else tokens[1:2]


def check_calls(lines: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Each script call's commands touched only its KEYS, all in one slot; calls per script."""
    by_sha = {
        hashlib.sha1(src.encode()).hexdigest(): name for name, src in script_sources().items()
    }
    seen: dict[str, int] = {}
    current: tuple[str, set[str]] | None = None
    for source, tokens in lines:
        if source != "lua":
            current = None
            if tokens and tokens[0].lower() in {"evalsha", "eval"}:
                name = by_sha.get(tokens[1], "(inline)")
                numkeys = int(tokens[2])
                given = tokens[3 : 3 + numkeys]
                current = (name, set(given))
                seen[name] = seen.get(name, 0) + 1
                if name != "submit_one":
                    slots = {key_slot(k.encode()) for k in given}
                    assert len(slots) <= 1, f"{name} spans slots: {given}"
            continue
        assert current is not None, f"a script command with no script: {tokens}"
        name, keys = current
        for key in _touched(tokens):
            assert key in keys, f"{name} touched {key!r}, not in its KEYS {sorted(keys)}"
    return seen


@pytest.fixture
def recorder(redis_url: str) -> Iterator[Recorder]:
    rec = Recorder(redis_url)
    yield rec
    if rec._thread.is_alive():
        rec.stop()


def _lane_store_flow(store: LaneStore, config: ServiceConfig, lane: str, now: float) -> None:
    """Every lane-store script, on ``lane``."""
    items = [make(config, now, lane=lane, custom_id=f"{lane}-{i}") for i in range(6)]
    tickets = store.submit_many(items, config, now=now)
    store.submit_one(make(config, now, lane=lane, custom_id=f"{lane}-one"), config, now=now)
    store.submit_one(make(config, now, lane=lane, custom_id=f"{lane}-one"), config, now=now)
    claimed = store.claim(lane, 7, lease_s=10, now=now)
    assert {t.id for t in tickets} <= {c.id for c in claimed}
    c1, c2, c3, c4 = claimed[:4]
    store.start(c1, state=State.RUNNING, route=Route.GPU, lease_s=10, now=now)
    store.renew_many([(c1.id, c1.token)], lease_s=20, now=now)
    store.finish(c1.id, c1.token, State.DONE, StoredResult.model_validate({"body": {}}), now=now)
    store.requeue(c2.id, c2.token, BOOM, ready_at=now + 1, now=now)
    store.requeue(c4.id, c4.token, BOOM, now=now)
    again = store.claim(lane, 10, lease_s=10, now=now + 2)  # the delayed retry is promoted
    assert c2.id in {c.id for c in again}
    store.cancel(c3.id, now=now)
    walk_deliveries(store, c1.id, c3.id, now)
    store.dlq.add(c3.id, BOOM, now=now)
    store.trim(lane, now + store.result_ttl_s + 1)
    store.redis.hset(store.keys.legacy_dead_letters(), c3.id, '{"id":"x","at":1}')
    store.dlq.adopt_legacy()


def test_the_lane_store_touches_only_the_keys_it_passes(
    store: LaneStore, service_config: ServiceConfig, recorder: Recorder
) -> None:
    config, now = with_hot_lanes(service_config), time.time()
    store.publish_config(config)
    for lane in ("standard", "hot"):
        _lane_store_flow(store, config, lane, now)
    with pytest.raises(LaneFull):  # a refused request's custom_id is released
        store.submit_many(
            [make(config, now, lane="tiny", custom_id=f"t{i}") for i in range(2)], config, now=now
        )
    seen = check_calls(recorder.stop())
    assert set(seen) >= LANE_SCRIPTS, f"never ran: {LANE_SCRIPTS - set(seen)}"


def test_the_monitor_check_catches_a_key_outside_KEYS(store: LaneStore, recorder: Recorder) -> None:
    """The check above would fail on the old claim.lua, which built hashes from a prefix."""
    script = store.redis.register_script("return redis.call('GET', ARGV[1] .. 'x')")
    script(keys=[store.keys.queue("standard")], args=[store.keys.lane_tag("standard")])
    with pytest.raises(AssertionError, match="not in its KEYS"):
        check_calls(recorder.stop())


def test_a_shard_is_its_own_slot_and_unsharded_keys_are_unchanged(namespace: str) -> None:
    k = Keys(namespace)
    assert k.queue("bulk") == f"{namespace}:{{lane:bulk}}:q"
    assert k.queue("bulk", 0) == k.queue("bulk")
    slots = {key_slot(k.queue("bulk", s).encode()) for s in range(8)}
    assert len(slots) == 8
    assert k.request("bulk.3.01J0000000000000000000000").startswith(k.lane_tag("bulk", 3))
