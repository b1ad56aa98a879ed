"""Every Lua script is a file in ``routing/lua/`` whose header documents what it touches.

The header (the leading ``--`` lines) names each ``KEYS[n]`` and ``ARGV[n]`` the script uses,
``X[n..]`` for a tail it reads in a loop, and what it returns; the scripts compile on a real
Redis; and no Python module carries Lua of its own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from routing.store.scripts import Scripts, script_sources

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "routing" / "lua"
NAMES = sorted(p.stem for p in LUA.glob("*.lua"))


@dataclass
class Indices:
    """Indices of one table (``KEYS`` or ``ARGV``): single ones, and open tails ``n..``."""

    single: set[int] = field(default_factory=set)
    tails: set[int] = field(default_factory=set)
    all_of_them: bool = False


def split(text: str) -> tuple[str, str]:
    """The header (leading comment lines) and the code, with trailing comments removed."""
    lines = text.splitlines()
    n = 0
    while n < len(lines) and lines[n].startswith("--"):
        n += 1
    code = "\n".join(line.split("--", 1)[0] for line in lines[n:])
    return "\n".join(lines[:n]), code


def used(code: str, table: str) -> Indices:
    out = Indices()
    out.single = {int(n) for n in re.findall(rf"\b{table}\[(\d+)\]", code)}
    # for i = 2, 5 do ... KEYS[i]: every index of the range
    for var, lo, hi in re.findall(r"\bfor (\w+) = (\d+), (\d+) do", code):
        if re.search(rf"\b{table}\[{var}\]", code):
            out.single |= set(range(int(lo), int(hi) + 1))
    # for i = 7, #ARGV do / unpack(ARGV, 3): a tail
    out.tails = {int(n) for n in re.findall(rf"\bfor \w+ = (\d+), #{table} do", code)}
    out.tails |= {int(n) for n in re.findall(rf"\bunpack\({table}, (\d+)\)", code)}
    out.all_of_them = bool(re.search(rf"\bipairs\({table}\)", code))
    return out


def documented(header: str, table: str) -> Indices:
    out = Indices()
    out.single = {int(n) for n in re.findall(rf"\b{table}\[(\d+)\]", header)}
    out.tails = {int(n) for n in re.findall(rf"\b{table}\[(\d+)\.\.\]", header)}
    out.all_of_them = f"{table}[i]" in header
    return out


@pytest.mark.parametrize("name", NAMES)
def test_the_header_names_every_key_and_argument(name: str) -> None:
    header, code = split((LUA / f"{name}.lua").read_text())
    assert header.startswith(f"-- {name}: "), f"{name}.lua must open with '-- {name}: <what>'"
    assert re.search(r"^-- returns ", header, re.M), f"{name}.lua: say what it returns"
    for table in ("KEYS", "ARGV"):
        use, doc = used(code, table), documented(header, table)
        for n in sorted(use.single):
            covered = n in doc.single or any(t <= n for t in doc.tails)
            assert covered, f"{name}.lua uses {table}[{n}] but its header does not name it"
        for n in sorted(use.tails):
            assert any(t <= n for t in doc.tails), f"{name}.lua: header lacks {table}[{n}..]"
        if use.all_of_them:
            assert doc.all_of_them, f"{name}.lua iterates {table}: header must say {table}[i]"
        for n in sorted(doc.single):
            named = n in use.single or any(t <= n for t in use.tails) or use.all_of_them
            assert named, f"{name}.lua: header names {table}[{n}], which it never uses"
        for n in sorted(doc.tails):
            assert n in use.tails, f"{name}.lua: header names {table}[{n}..], never read"


def test_the_loader_finds_every_file() -> None:
    assert sorted(script_sources()) == NAMES
    assert len(NAMES) >= 20


def test_every_script_is_run_by_some_module() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "routing").rglob("*.py"))
    unused = [name for name in NAMES if f'"{name}"' not in source]
    assert unused == [], f"scripts no code runs: {unused}"


def test_every_script_loads_on_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        scripts = Scripts(client)
        for name, text in script_sources().items():
            sha = hashlib.sha1(text.encode()).hexdigest()
            assert client.script_load(text) == sha, name
            assert client.script_exists(sha) == [True], name
        assert sorted(scripts) == NAMES
    finally:
        client.close()


def test_no_python_module_carries_lua() -> None:
    """A module registers only the scripts of ``routing/lua`` (``script_sources``), never its own."""
    offenders = []
    for top in ("routing", "tasks", "config"):
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text()
            if "redis.call" in text or (
                "register_script(" in text
                and path != ROOT / "routing/store/scripts.py"
                and "script_sources()" not in text
            ):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], "Lua belongs in routing/lua/, loaded by routing.store.scripts"
