"""Enqueue cost: mixbatch's durable lane store against one Celery message per request.

A team that wants to push many LLM requests through Celery would otherwise write one task per
request and call ``apply_async`` for each. mixbatch instead writes each request durably into a
lane (a Lua script per request, idempotent on ``custom_id``) and batches the round trips. This
script measures both on the *same* Redis in the *same* run, so that machine noise, the Redis
build and its fsync policy hit both sides alike and the ratios mean something even on a shared,
noisy machine where the absolute figures do not:

1. bulk throughput: ``Client.submit_many(items, chunk_size=1000)`` into the ``bulk`` lane, against
   a loop of ``bench.handle.apply_async(args=(item,))`` with the same items (no worker consumes
   them; only the producer's cost is measured), and against the floor of what Redis can take:
   a raw redis-py pipeline of one ``HSET`` (the item's JSON) and one ``ZADD`` (its deadline)
   per request, sent in the same chunks, with no validation, no idempotency and no state;
2. single-call latency: ``Client.submit(item)`` against ``apply_async`` of one message, in
   alternating blocks so that a noisy spell lands on both sides.

Each measurement is repeated (``--repeat``) and the median is reported. By default a fresh
embedded Redis with ``appendfsync always`` (mixbatch's default durability) is started in a
temporary directory and removed at the end; ``--redis-url`` points at another Redis instead, in
which case only this run's keys (a unique namespace and a unique Celery queue) are deleted.

    .venv/bin/python benchmarks/enqueue.py                 # markdown table
    .venv/bin/python benchmarks/enqueue.py --json          # machine-readable
    .venv/bin/python benchmarks/enqueue.py --fsync everysec --n 50000
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celery
import redis
from celery import Celery

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.enqueue_report import markdown
from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.models import ServiceConfig
from routing.store.base import redact_url
from routing.store.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
LANE = "bulk"
BULK_GOAL = 25.0
"""bulk submit must be at least this many times the apply_async throughput."""
RAW_GOAL = 0.8
"""bulk submit must reach at least this share of the raw pipeline's throughput."""
LATENCY_GOAL = 1.0
"""single submit p50 may be at most this multiple of the apply_async p50 (no slower)."""
WARMUP_CALLS = 50

SYSTEM_PROMPT = (
    "You are a support analyst. Summarise the customer's ticket in two sentences, then give "
    "its category (billing, bug, how-to, account) and an urgency from 1 to 5 as JSON."
)
TICKET_TEMPLATE = (
    "Ticket #{i}: Hi, since this morning the export button on the reports page spins forever "
    "and the CSV never downloads. I tried Chrome and Firefox and cleared the cache. We need "
    "the monthly figures for a board meeting tomorrow. Account {account}, plan Team."
)


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays a clean table or JSON document."""
    print(message, file=sys.stderr, flush=True)


def make_item(tag: str, i: int) -> dict[str, Any]:
    """One realistic small chat request (about 700 bytes of JSON) with a unique custom_id.

    Both sides get exactly this dict: mixbatch as the request, Celery as the task's argument,
    so neither serialises a smaller payload than the other.
    """
    return {
        "custom_id": f"{tag}-{i}",
        "lane": LANE,
        "endpoint": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": TICKET_TEMPLATE.format(i=i, account=10_000 + i)},
            ],
            "max_tokens": 200,
            "temperature": 0.2,
        },
        "metadata": {"team": "support", "job": "ticket-summaries"},
    }


def make_items(tag: str, n: int) -> list[dict[str, Any]]:
    return [make_item(tag, i) for i in range(n)]


def load_config() -> ServiceConfig:
    """The lanes table from ``config/lanes.toml`` (or ``MIXBATCH_LANES_FILE``).

    Parsed directly rather than through ``config.settings`` because importing the ``config``
    package also builds the service's Celery app, which a producer-side benchmark should not.
    """
    path = Path(os.environ.get("MIXBATCH_LANES_FILE") or ROOT / "config" / "lanes.toml")
    return ServiceConfig(lanes=parse_lanes(path.read_text(), source=str(path)))


def make_celery(url: str, queue: str) -> tuple[Celery, Any]:
    """The baseline a team would write: a Celery app on the same Redis, JSON, one dummy task.

    A unique default queue keeps its messages apart from anything else in that Redis, so the
    run can delete exactly what it wrote.
    """
    app = Celery("bench", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="bench.handle")
    def handle(request: dict[str, Any]) -> None:
        """Never runs here: no worker consumes the queue, only sending is timed."""

    return app, handle


def collect_garbage() -> None:
    """Collect before each timed section, but leave the GC on inside it.

    Collecting first stops garbage left by one side from being collected on the other side's
    clock; leaving it on counts the collections a side's own allocations cause, which a real
    producer pays too.
    """
    gc.collect()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values: always a latency that was observed."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


@dataclass
class Series:
    """One figure measured ``--repeat`` times; the median is what gets reported."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "runs": self.runs}


@dataclass
class Results:
    mixbatch_rps: Series = field(default_factory=Series)
    celery_rps: Series = field(default_factory=Series)
    raw_rps: Series = field(default_factory=Series)
    mixbatch_ms: dict[str, Series] = field(
        default_factory=lambda: {p: Series() for p in ("p50", "p95", "p99")}
    )
    celery_ms: dict[str, Series] = field(
        default_factory=lambda: {p: Series() for p in ("p50", "p95", "p99")}
    )


class Bench:
    """Both producers on one Redis, plus the bookkeeping to leave that Redis as it was."""

    def __init__(self, url: str, *, chunk_size: int) -> None:
        token = uuid.uuid4().hex[:10]
        self.url = url
        self.chunk_size = chunk_size
        self.namespace = f"bench-enqueue-mb-{token}"
        self.queue = f"bench-enqueue-celery-{token}"
        self.admin = redis.Redis.from_url(url)
        self.client = Client(url, namespace=self.namespace, config=load_config())
        self.app, self.task = make_celery(url, self.queue)
        self._batch = 0

    def close(self) -> None:
        """Delete this run's keys only (never FLUSHDB: ``--redis-url`` may be shared)."""
        try:
            self.purge()
        finally:
            self.client.close()
            self.app.close()
            self.admin.close()

    def purge(self) -> None:
        """Drop what the previous repeat wrote so every repeat starts from the same state."""
        keys = [*self.admin.scan_iter(match=f"{self.namespace}:*", count=2000)]
        keys += [*self.admin.scan_iter(match=f"*{self.queue}*", count=2000)]
        for start in range(0, len(keys), 1000):
            self.admin.unlink(*keys[start : start + 1000])

    def tag(self) -> str:
        """A fresh custom_id prefix, so no request is ever a duplicate of an earlier one."""
        self._batch += 1
        return f"b{self._batch}"

    def warm_up(self) -> None:
        """Open connections, load Lua scripts and declare the Celery queue before timing."""
        items = make_items(self.tag(), WARMUP_CALLS)
        for item in items:
            self.client.submit(item)
            self.task.apply_async(args=(item,))
        self.client.submit_many(make_items(self.tag(), self.chunk_size), chunk_size=self.chunk_size)
        self.purge()

    def bulk_mixbatch(self, n: int) -> float:
        """Requests/s of one ``submit_many`` call, validation included (it is part of submit)."""
        items = make_items(self.tag(), n)
        collect_garbage()
        started = time.perf_counter()
        tickets = self.client.submit_many(items, chunk_size=self.chunk_size)
        elapsed = time.perf_counter() - started
        if len(tickets) != n or any(t.duplicate for t in tickets):
            raise RuntimeError(f"submit_many returned {len(tickets)} tickets for {n} items")
        return n / elapsed

    def bulk_raw(self, n: int) -> float:
        """Requests/s of a bare pipeline, one HSET and one ZADD per request, per chunk: what
        Redis takes when the producer adds nothing (no validation, idempotency or state)."""
        items = make_items(self.tag(), n)
        prefix, queue = f"{self.namespace}:raw:", f"{self.namespace}:raw-queue"
        deadline = time.time() + 86400
        collect_garbage()
        started = time.perf_counter()
        for start in range(0, n, self.chunk_size):
            pipe = self.admin.pipeline(transaction=False)
            for item in items[start : start + self.chunk_size]:
                key = prefix + item["custom_id"]
                pipe.hset(key, mapping={"data": json.dumps(item), "state": "queued"})
                pipe.zadd(queue, {key: deadline})
            pipe.execute()
        elapsed = time.perf_counter() - started
        if self.admin.zcard(queue) != n:
            raise RuntimeError(f"the raw pipeline queued {self.admin.zcard(queue)} of {n}")
        return n / elapsed

    def bulk_celery(self, n: int) -> float:
        """Requests/s of ``apply_async`` called once per request, as a Celery user would."""
        items = make_items(self.tag(), n)
        before = self.admin.llen(self.queue)
        apply_async = self.task.apply_async
        collect_garbage()
        started = time.perf_counter()
        for item in items:
            apply_async(args=(item,))
        elapsed = time.perf_counter() - started
        sent = self.admin.llen(self.queue) - before
        if sent != n:
            raise RuntimeError(f"apply_async left {sent} messages in {self.queue}, expected {n}")
        return n / elapsed

    def latency(self, calls: int, block: int) -> tuple[list[float], list[float]]:
        """Per-call milliseconds of ``Client.submit`` and ``apply_async``, alternating blocks.

        Blocks rather than strict alternation keep each side's connection and caches in the
        state they are in under steady use; swapping which side goes first every block stops
        either one from always following the other.
        """
        items = make_items(self.tag(), calls)
        submit, apply_async = self.client.submit, self.task.apply_async
        mixbatch_ms: list[float] = []
        celery_ms: list[float] = []

        def run_mixbatch(chunk: list[dict[str, Any]]) -> None:
            for item in chunk:
                started = time.perf_counter_ns()
                submit(item)
                mixbatch_ms.append((time.perf_counter_ns() - started) / 1e6)

        def run_celery(chunk: list[dict[str, Any]]) -> None:
            for item in chunk:
                started = time.perf_counter_ns()
                apply_async(args=(item,))
                celery_ms.append((time.perf_counter_ns() - started) / 1e6)

        sides: list[Callable[[list[dict[str, Any]]], None]] = [run_mixbatch, run_celery]
        collect_garbage()
        for number, start in enumerate(range(0, calls, block)):
            chunk = items[start : start + block]
            for side in sides if number % 2 == 0 else sides[::-1]:
                side(chunk)
        return mixbatch_ms, celery_ms


def measure(args: argparse.Namespace, url: str) -> Results:
    """Run every measurement ``--repeat`` times, alternating which side goes first."""
    results = Results()
    bench = Bench(url, chunk_size=args.chunk_size)
    try:
        bench.warm_up()
        for rep in range(args.repeat):
            log(f"repeat {rep + 1}/{args.repeat}: bulk, n={args.n}")
            sides = [
                (results.mixbatch_rps, bench.bulk_mixbatch),
                (results.celery_rps, bench.bulk_celery),
                (results.raw_rps, bench.bulk_raw),
            ]
            for series, side in sides[rep % 3 :] + sides[: rep % 3]:  # who goes first rotates
                series.runs.append(side(args.n))
                bench.purge()
            log(
                f"  submit_many {results.mixbatch_rps.runs[-1]:,.0f}/s, "
                f"apply_async {results.celery_rps.runs[-1]:,.0f}/s, "
                f"raw pipeline {results.raw_rps.runs[-1]:,.0f}/s"
            )
            log(f"repeat {rep + 1}/{args.repeat}: latency, {args.calls} calls each")
            mixbatch_ms, celery_ms = bench.latency(args.calls, args.block)
            bench.purge()
            for name, values in (("mixbatch", mixbatch_ms), ("celery", celery_ms)):
                ordered = sorted(values)
                target = results.mixbatch_ms if name == "mixbatch" else results.celery_ms
                for q in (50, 95, 99):
                    target[f"p{q}"].runs.append(percentile(ordered, q))
            log(
                f"  p50 submit {results.mixbatch_ms['p50'].runs[-1]:.3f} ms, "
                f"apply_async {results.celery_ms['p50'].runs[-1]:.3f} ms"
            )
    finally:
        bench.close()
    return results


def redis_facts(url: str) -> dict[str, Any]:
    """Version and fsync policy as the server reports them, so a result names its setup."""
    with redis.Redis.from_url(url) as r:
        server = r.info("server")
        facts: dict[str, Any] = {"version": server.get("redis_version"), "url": redact_url(url)}
        try:
            facts["appendonly"] = r.config_get("appendonly").get("appendonly")
            facts["appendfsync"] = r.config_get("appendfsync").get("appendfsync")
        except redis.ResponseError:  # CONFIG may be disabled on a managed Redis
            facts["appendonly"] = facts["appendfsync"] = "unknown"
    return facts


def report(args: argparse.Namespace, results: Results, facts: dict[str, Any]) -> dict[str, Any]:
    """Everything in one document: medians, every run, per-repeat paired ratios, the goals."""
    bulk_ratio = results.mixbatch_rps.median / results.celery_rps.median
    raw_ratio = results.mixbatch_rps.median / results.raw_rps.median
    p50_ratio = results.mixbatch_ms["p50"].median / results.celery_ms["p50"].median
    return {
        "benchmark": "enqueue",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "celery": celery.__version__,
            "redis_py": redis.__version__,
        },
        "redis": {**facts, "embedded": args.redis_url is None},
        "params": {
            "n": args.n,
            "chunk_size": args.chunk_size,
            "latency_calls": args.calls,
            "latency_block": args.block,
            "repeat": args.repeat,
            "lane": LANE,
        },
        "bulk": {
            "mixbatch_submit_many_rps": results.mixbatch_rps.as_dict(),
            "celery_apply_async_rps": results.celery_rps.as_dict(),
            "ratio": bulk_ratio,
            "paired_ratios": [
                m / c
                for m, c in zip(results.mixbatch_rps.runs, results.celery_rps.runs, strict=True)
            ],
            "goal": f">= {BULK_GOAL:g}x",
            "met": bulk_ratio >= BULK_GOAL,
            "raw_pipeline_rps": results.raw_rps.as_dict(),
            "of_raw": raw_ratio,
            "paired_of_raw": [
                m / r for m, r in zip(results.mixbatch_rps.runs, results.raw_rps.runs, strict=True)
            ],
            "raw_goal": f">= {RAW_GOAL:g}",
            "raw_met": raw_ratio >= RAW_GOAL,
        },
        "latency_ms": {
            "mixbatch_submit": {q: s.as_dict() for q, s in results.mixbatch_ms.items()},
            "celery_apply_async": {q: s.as_dict() for q, s in results.celery_ms.items()},
            "p50_ratio": p50_ratio,
            "paired_p50_ratios": [
                m / c
                for m, c in zip(
                    results.mixbatch_ms["p50"].runs, results.celery_ms["p50"].runs, strict=True
                )
            ],
            "goal": f"<= {LATENCY_GOAL:g}x",
            "met": p50_ratio <= LATENCY_GOAL,
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="mixbatch submit vs Celery apply_async, side by side on one Redis."
    )
    parser.add_argument("--n", type=int, default=20_000, help="requests per bulk run")
    parser.add_argument("--chunk-size", type=int, default=1000, help="submit_many chunk_size")
    parser.add_argument("--calls", type=int, default=2000, help="single calls per side per repeat")
    parser.add_argument("--block", type=int, default=50, help="calls per alternating block")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    parser.add_argument(
        "--redis-url", default=None, help="use this Redis instead of a fresh embedded one"
    )
    parser.add_argument(
        "--fsync",
        choices=("always", "everysec"),
        default="always",
        help="appendfsync of the embedded Redis (mixbatch's default is always)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    for name in ("n", "chunk_size", "calls", "block", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.redis_url is not None and args.fsync != "always":
        parser.error("--fsync applies to the embedded Redis only; configure yours directly")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    tmpdir: str | None = None
    server: EmbeddedRedis | None = None
    try:
        if args.redis_url is None:
            tmpdir = tempfile.mkdtemp(prefix="mixbatch-bench-")
            server = EmbeddedRedis(tmpdir, appendfsync=args.fsync).start()
            url = server.url
            log(f"embedded redis on {url}, appendfsync {args.fsync}, data in {tmpdir}")
        else:
            url = args.redis_url
        facts = redis_facts(url)
        results = measure(args, url)
    finally:
        if server is not None:
            server.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    doc = report(args, results, facts)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    log(f"done in {doc['wall_s']} s")
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
