"""hiredis against redis-py's own reply parser, side by side, on the batch route's reads.

The batch route reads many small replies per chunk: ``holders`` (one ``HMGET`` of a request's
data, state and token per request) and the scripts' replies (``settle``, ``start``). redis-py
parses replies with hiredis when it is installed, else in Python. This measures both parsers
on the same embedded Redis in one run, alternating which goes first, and reports medians:

    .venv/bin/python benchmarks/redis_parser.py --n 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import redis
from redis._parsers import _HiredisParser, _RESP2Parser
from redis.connection import ConnectionPool

from routing.store.embedded import EmbeddedRedis

CHUNK = 1000
DATA = json.dumps({"body": {"messages": [{"role": "user", "content": "x" * 600}]}, "lane": "bulk"})


def client(url: str, parser: type) -> redis.Redis:
    return redis.Redis(connection_pool=ConnectionPool.from_url(url, parser_class=parser))


def fill(r: redis.Redis, n: int) -> list[str]:
    keys = [f"bench-parser:{i}" for i in range(n)]
    for start in range(0, n, CHUNK):
        pipe = r.pipeline(transaction=False)
        for key in keys[start : start + CHUNK]:
            pipe.hset(key, mapping={"data": DATA, "state": "submitted", "lease_token": "t" * 32})
        pipe.execute()
    return keys


def read(r: redis.Redis, keys: list[str]) -> float:
    """Requests/s of pipelined HMGETs, a chunk per round trip (what ``holders`` does)."""
    started = time.perf_counter()
    for start in range(0, len(keys), CHUNK):
        pipe = r.pipeline(transaction=False)
        for key in keys[start : start + CHUNK]:
            pipe.hmget(key, "data", "state", "lease_token")
        pipe.execute()
    return len(keys) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"hiredis": [], "python": []}
    with tempfile.TemporaryDirectory(prefix="mixbatch-bench-") as tmp:
        server = EmbeddedRedis(tmp, appendfsync="everysec").start()
        try:
            sides = {"hiredis": client(server.url, _HiredisParser)}
            sides["python"] = client(server.url, _RESP2Parser)
            keys = fill(sides["python"], args.n)
            for rep in range(args.repeat):
                order = ["hiredis", "python"] if rep % 2 == 0 else ["python", "hiredis"]
                for name in order:
                    runs[name].append(read(sides[name], keys))
            for r in sides.values():
                r.close()
        finally:
            server.stop()
    doc: dict[str, Any] = {
        "n": args.n,
        "runs": runs,
        "median_rps": {k: statistics.median(v) for k, v in runs.items()},
    }
    doc["hiredis_over_python"] = doc["median_rps"]["hiredis"] / doc["median_rps"]["python"]
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print("| parser | HMGET replies/s (median) | runs |")
    print("|---|---:|---|")
    for name, values in runs.items():
        cells = ", ".join(f"{v:,.0f}" for v in values)
        print(f"| {name} | {doc['median_rps'][name]:,.0f} | {cells} |")
    print(f"\nhiredis / python: {doc['hiredis_over_python']:.2f}x")


if __name__ == "__main__":
    main()
