"""Scale-out cost: the same workload on one Redis node, a 3-master Redis Cluster, and the cluster
with the hot lane sharded 8 ways, side by side in one run on this machine.

Per topology:

1. **submit**: ``Client.submit_many`` of ``--n`` requests into one lane (``standard``, the hot
   one), in chunks of 1000, no worker running: requests per second, and from ``INFO`` before and
   after, Redis commands and network bytes per request (summed over every master);
2. **memory per queued request**: ``used_memory`` grown by those ``--n`` queued requests,
   summed over every master, divided by ``--n``;
3. **end to end**: ``--e2e`` mixed requests (realtime and batch routes, the sandbox provider)
   through two worker processes (concurrency 2 each), submit to the last delivery, with a Celery
   callback per request: requests per second.

The broker is a plain Redis of its own on every leg (Celery's Redis transport does not speak
Cluster), so the legs differ only in the lane store. A 2-core machine cannot show scaling: the
figures are per-request costs on each topology; ``docs/scale-out.md`` extrapolates from them.

    .venv/bin/python benchmarks/scale.py --n 2000 --e2e 300          # markdown table
    .venv/bin/python benchmarks/scale.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.client import Client  # noqa: E402
from routing.decide.lanes import parse_lanes  # noqa: E402
from routing.models import ServiceConfig  # noqa: E402
from routing.sandbox import Knobs  # noqa: E402
from tasks.cli.demo import demo_workload  # noqa: E402
from tests.servers import (  # noqa: E402
    RedisCluster,
    RedisNode,
    delivered_counts,
    free_ports,
    start_stack,
    wait_until,
)
from tests.test_e2e import CALLBACK  # noqa: E402

LANES = (ROOT / "config" / "lanes.toml").read_text()


def config(shards: int) -> ServiceConfig:
    """The shipped lanes; ``standard`` (the hot lane here) spread over ``shards`` slots."""
    text = LANES.replace(
        "[lanes.standard]\n",
        f"[lanes.standard]\nshards = {shards}\n" if shards > 1 else "[lanes.standard]\n",
    )
    return ServiceConfig(lanes=parse_lanes(text))


def masters(nodes: list[RedisNode]) -> list[redis.Redis]:
    out = []
    for node in nodes:
        r = node.client()
        if r.info("replication")["role"] == "master":
            out.append(r)
        else:
            r.close()
    return out


def totals(clients: list[redis.Redis]) -> dict[str, int]:
    """Commands processed, bytes in and out, memory used: summed over ``clients``."""
    out = {"commands": 0, "bytes_in": 0, "bytes_out": 0, "memory": 0}
    for r in clients:
        info = r.info()
        out["commands"] += int(info["total_commands_processed"])
        out["bytes_in"] += int(info["total_net_input_bytes"])
        out["bytes_out"] += int(info["total_net_output_bytes"])
        out["memory"] += int(info["used_memory"])
    return out


def submit_leg(url: str, nodes: list[RedisNode], n: int, shards: int) -> dict[str, float]:
    cfg = config(shards)
    items = [
        {"lane": "standard", "endpoint": "/v1/embeddings", "custom_id": f"s{i}",
         "body": {"model": "text-embedding-3-small", "input": f"document {i} " * 8}}
        for i in range(n)
    ]  # fmt: skip
    clients = masters(nodes)
    try:
        with Client(url, namespace=f"bench{shards}", config=cfg) as client:
            client.store.publish_config(cfg)
            client.submit_many(items[:50])  # warm: scripts loaded, connections open
            before = totals(clients)
            start = time.perf_counter()
            client.submit_many(items[50:], chunk_size=1000)
            elapsed = time.perf_counter() - start
            after = totals(clients)
    finally:
        for r in clients:
            r.close()
    m = n - 50
    return {
        "submit_per_s": m / elapsed,
        "commands_per_request": (after["commands"] - before["commands"]) / m,
        "bytes_in_per_request": (after["bytes_in"] - before["bytes_in"]) / m,
        "bytes_out_per_request": (after["bytes_out"] - before["bytes_out"]) / m,
        "memory_per_queued_request": (after["memory"] - before["memory"]) / m,
    }


def e2e_leg(
    url: str, nodes: list[RedisNode], broker: RedisNode, tmp: Path, n: int, shards: int
) -> dict[str, float]:
    ns = f"e2e{shards}{int(time.time())}"
    stack = start_stack(
        tmp / ns, url, counts_url=broker.url, knobs=Knobs(latency_ms=5, batch_turnaround_s=1.0),
        env={"MIXBATCH_BROKER_URL": broker.url}, namespace=ns, config=config(shards),
    )  # fmt: skip
    try:
        items = [{**item, "callback": CALLBACK} for item in demo_workload(n)]
        clients = masters(nodes)
        before = totals(clients)
        start = time.perf_counter()
        with Client(url, namespace=ns) as client:
            client.submit_many(items)
        wait_until(lambda: len(delivered_counts(broker.url, ns)) >= n, 600, "every delivery")
        elapsed = time.perf_counter() - start
        after = totals(clients)
        for r in clients:
            r.close()
        return {
            "e2e_per_s": n / elapsed,
            # the whole life: submit, claim, start, finish, deliver, sweeps and polls meanwhile
            "e2e_commands_per_request": (after["commands"] - before["commands"]) / n,
            "e2e_bytes_per_request": (
                after["bytes_in"] + after["bytes_out"] - before["bytes_in"] - before["bytes_out"]
            )
            / n,
            "retained_memory_per_request": (after["memory"] - before["memory"]) / n,
        }
    finally:
        stack.stop()


@contextlib.contextmanager
def topology(name: str, tmp: Path) -> Iterator[tuple[str, list[RedisNode]]]:
    if name == "one node":
        node = RedisNode(tmp / "node", free_ports(1)[0]).start()
        try:
            yield node.url, [node]
        finally:
            node.stop()
        return
    cluster = RedisCluster(tmp / "cluster", masters=3, replicas=0).start()
    try:
        yield cluster.url, cluster.nodes
    finally:
        cluster.stop()


LEGS: list[tuple[str, str, int]] = [
    ("one node", "one node", 1),
    ("3-master cluster", "cluster", 1),
    ("3-master cluster, hot lane 8 shards", "cluster", 8),
]


def run(n: int, e2e: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mixbatch-scale-") as tmp_text:
        tmp = Path(tmp_text)
        broker = RedisNode(tmp / "broker", free_ports(1)[0]).start()
        try:
            for label, kind, shards in LEGS:
                with topology(kind, tmp / f"leg{len(results)}") as (url, nodes):
                    row = submit_leg(url, nodes, n, shards)
                    if e2e:
                        row.update(e2e_leg(url, nodes, broker, tmp, e2e, shards))
                    results[label] = row
        finally:
            broker.stop()
    return {
        "n": n,
        "e2e": e2e,
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "results": results,
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def markdown(report: dict[str, Any]) -> str:
    cols: list[tuple[str, str, Callable[[float], str]]] = [
        ("submit_per_s", "submit req/s", lambda v: f"{v:,.0f}"),
        ("commands_per_request", "Redis cmds/req", lambda v: f"{v:.1f}"),
        ("bytes_in_per_request", "bytes in/req", lambda v: f"{v:,.0f}"),
        ("bytes_out_per_request", "bytes out/req", lambda v: f"{v:,.0f}"),
        ("memory_per_queued_request", "memory/queued req", lambda v: f"{v:,.0f} B"),
        ("e2e_per_s", "end-to-end req/s", lambda v: f"{v:,.1f}"),
        ("e2e_commands_per_request", "life cmds/req", lambda v: f"{v:.1f}"),
        ("e2e_bytes_per_request", "life bytes/req", lambda v: f"{v:,.0f}"),
        ("retained_memory_per_request", "memory/finished req", lambda v: f"{v:,.0f} B"),
    ]
    lines = [
        f"submit n={report['n']}, end to end n={report['e2e']}, {report['machine']['cpus']} CPUs",
        "",
        "| topology | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in report["results"].items():
        cells = [fmt(row[key]) if key in row else "-" for key, _, fmt in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="requests per submit leg")
    parser.add_argument(
        "--e2e", type=int, default=300, help="requests per end-to-end leg (0: skip)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.n, args.e2e)
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    main()
