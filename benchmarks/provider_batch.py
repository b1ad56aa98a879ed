"""Provider batch route, end to end: N requests from submit to delivered through the sandbox.

Part (b) of the provider-batch benchmark (part (a), planning and JSONL building, is
``benchmarks/provider_batch_plan.py``). Everything is real: an embedded Redis, the sandbox
provider over loopback HTTP with instant batch turnaround, Celery workers and beat as
subprocesses. The clock runs from the first ``submit_many`` call until every request is
DELIVERED; requests carry no callback, so delivery is the built-in result store.

    .venv/bin/python benchmarks/provider_batch.py --n 100000
    .venv/bin/python benchmarks/provider_batch.py --n 20000 --profile /tmp/prof

``--profile DIR`` runs every Celery pool process under cProfile (``benchmarks/profiling``,
one ``<pid>.prof`` each), the producer's ``submit_many`` too (``producer.prof``), and adds the
Redis server's ``INFO commandstats`` for the run, per request, to the report.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.models import ServiceConfig
from routing.sandbox import Knobs
from tasks.cli.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent

ENV = {
    "MIXBATCH_LOG_LEVEL": "WARNING",
    "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
    "MIXBATCH_CLAIM_BATCH": "5000",
    "MIXBATCH_BATCH_TURNAROUND_S": '{"openai": 5, "anthropic": 5}',
    "MIXBATCH_BATCH_MARGIN_S": "60",
    "MIXBATCH_BATCH_MAX_WAIT_S": "1",
    "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_INTERVAL_S": "0.5",
    "MIXBATCH_BATCH_POLL_MAX_INTERVAL_S": "1",
    "MIXBATCH_SWEEP_INTERVAL_S": "5",
}


def workload(n: int) -> list[dict[str, Any]]:
    """Bulk chat requests, each distinct (no dedupe shortcut), about 300 bytes of body."""
    return [
        {
            "custom_id": f"bench-{i}",
            "lane": "bulk",
            "endpoint": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "max_tokens": 16,
                "messages": [
                    {"role": "user", "content": f"Classify ticket #{i}: the printer is on fire."}
                ],
            },
        }
        for i in range(n)
    ]


def delivered(client: Client) -> int:
    return client.store.lane_stats("bulk").counts.get("delivered", 0)


def commandstats(client: Client, n: int) -> dict[str, dict[str, float]]:
    """The Redis server's calls and microseconds per command, per request of the run."""
    raw = client.store.redis.info("commandstats")
    out = {}
    for name, stat in sorted(raw.items(), key=lambda kv: -kv[1]["usec"]):
        out[name.removeprefix("cmdstat_")] = {
            "calls_per_request": round(stat["calls"] / n, 3),
            "usec_per_request": round(stat["usec"] / n, 2),
        }
    return out


def run(
    n: int, workers: int, concurrency: int, timeout_s: float, profile: Path | None = None
) -> dict[str, Any]:
    env = dict(ENV)
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        hook = str(ROOT / "benchmarks" / "profiling")
        path = (hook, str(ROOT), os.environ.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env["MIXBATCH_BENCH_PROFILE"] = str(profile.resolve())
    config = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
    items = workload(n)
    with tempfile.TemporaryDirectory(prefix="mixbatch-bench-") as tmp:
        stack = LocalStack(
            Path(tmp),
            namespace="bench",
            knobs=Knobs(batch_turnaround_s=0.0, batch_validating_s=0.0),
            env=env,
        )
        with stack:
            stack.publish(config)
            names = [f"w{i}" for i in range(workers)]
            for name in names:
                stack.start_worker(name, concurrency=concurrency)
            stack.start_beat()
            stack.wait_workers(names)
            with Client(stack.url, namespace="bench", config=config) as client:
                client.store.redis.config_resetstat()
                producer = cProfile.Profile() if profile is not None else None
                start = time.perf_counter()
                if producer is not None:
                    producer.enable()
                client.submit_many(items, chunk_size=5000)
                if producer is not None and profile is not None:
                    producer.disable()
                    producer.dump_stats(profile / "producer.prof")
                submitted = time.perf_counter() - start
                end = time.monotonic() + timeout_s
                done = 0
                while time.monotonic() < end:
                    done = delivered(client)
                    if done >= n:
                        break
                    time.sleep(0.2)
                elapsed = time.perf_counter() - start
                batches = stack.sandbox.stats()["batches"]["created"]
                redis_stats = commandstats(client, n) if profile is not None else None
    return {
        "n": n,
        "delivered": done,
        "workers": workers,
        "concurrency": concurrency,
        "submit_s": round(submitted, 2),
        "total_s": round(elapsed, 2),
        "requests_per_s": round(done / elapsed),
        "provider_batches": batches,
        **({"redis_commandstats": redis_stats} if redis_stats is not None else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", type=Path, help="write cProfile files and commandstats here")
    args = parser.parse_args()
    result = run(args.n, args.workers, args.concurrency, args.timeout, args.profile)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| requests | delivered | submit s | submit to delivered s | req/s | provider batches |")
    print("|---:|---:|---:|---:|---:|---|")
    print(
        f"| {result['n']:,} | {result['delivered']:,} | {result['submit_s']} | {result['total_s']} "
        f"| {result['requests_per_s']:,} | {result['provider_batches']} |"
    )


if __name__ == "__main__":
    main()
