"""Every Lua script mixbatch runs, loaded from ``routing/lua/`` by glob and registered per client.

One file per atomic transition, named for it; each file's header lists its KEYS and ARGV and
what it returns. Adding a script is adding a file: nothing here names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

__all__ = ["Scripts", "script_sources"]


@cache
def script_sources() -> Mapping[str, str]:
    """Name (the file's stem) -> source of every ``*.lua`` shipped in ``routing/lua``."""
    folder = resources.files("routing").joinpath("lua")
    return {
        entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".lua")
    }


class Scripts(dict[str, Script]):
    """Every script, registered for ``client``: ``scripts["claim"](keys=..., args=...)``.

    Registering hashes the text locally; the server loads a script on its first call (redis-py
    falls back from EVALSHA to EVAL), so building this is cheap and needs no round trip.
    """

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(
            (name, client.register_script(text)) for name, text in script_sources().items()
        )

    def __missing__(self, name: str) -> Script:
        raise KeyError(f"no script routing/lua/{name}.lua")
