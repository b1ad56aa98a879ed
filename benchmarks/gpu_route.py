"""The whole local route against the bare micro-batcher, and urgent latency under bulk load.

Same texts, same device, one run:

1. bare: ``gpu_worker`` ``Engine.run`` on all texts in-process (the micro-batcher alone);
2. route: the same texts submitted through Redis and Celery (``submit_many`` into ``bulk``,
   aggregate, the ``gpu`` worker, results stored and delivered), timed to the last DONE;
3. urgent under load: while (2) saturates the device, a few urgent requests are submitted one
   at a time; their submit-to-done latency is reported (p50, p99).

    .venv/bin/python benchmarks/gpu_route.py --n 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.models import ServiceConfig
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent


def texts(n: int) -> list[str]:
    """A realistic length mix: short queries, paragraphs, a few long documents."""
    out = []
    for i in range(n):
        words = (8, 40, 120)[i % 3] if i % 10 else 240
        out.append(" ".join(f"word{(i * 7 + j) % 997}" for j in range(words)))
    return out


def bare(items: list[str]) -> float:
    from gpu_worker.config import load_models, pick_device
    from gpu_worker.engine import Engine, LocalRequest

    spec = load_models(ROOT / "config" / "models.toml")[LOCAL_MODEL]
    engine = Engine(spec, pick_device(None))
    requests = [
        LocalRequest(id=str(i), endpoint="/v1/embeddings", body={"model": LOCAL_MODEL, "input": t})
        for i, t in enumerate(items)
    ]
    start = time.perf_counter()
    answers = engine.run(requests)
    elapsed = time.perf_counter() - start
    assert all(a.ok for a in answers)
    return len(items) / elapsed


def route(items: list[str], urgent_n: int) -> tuple[float, list[float]]:
    config = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
    env = {
        "MIXBATCH_LOG_LEVEL": "WARNING",
        "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
        "MIXBATCH_GPU_CHUNK": "64",
        "MIXBATCH_PROVIDERS": "[]",
    }
    with tempfile.TemporaryDirectory(prefix="mixbatch-bench-") as tmp:  # noqa: SIM117
        with LocalStack(Path(tmp), namespace="bench", sandbox=False, env=env) as stack:
            stack.publish(config)
            stack.start_worker("worker", concurrency=1)
            stack.start_gpu_worker()
            stack.start_beat()
            stack.wait_workers(["worker", "gpu"], timeout_s=180)
            latencies: list[float] = []
            with Client(stack.url, namespace="bench", config=config) as client:
                body = [
                    {
                        "lane": "bulk",
                        "endpoint": "/v1/embeddings",
                        "body": {"model": LOCAL_MODEL, "input": t},
                    }
                    for t in items
                ]
                start = time.perf_counter()
                tickets = client.submit_many(body)

                def urgent() -> None:
                    with Client(stack.url, namespace="bench", config=config) as c:
                        for i in range(urgent_n):
                            t0 = time.perf_counter()
                            ticket = c.submit(
                                lane="urgent",
                                endpoint="/v1/embeddings",
                                body={"model": LOCAL_MODEL, "input": f"urgent question {i}"},
                            )
                            c.result(ticket.id, timeout=120)
                            latencies.append(time.perf_counter() - t0)
                            time.sleep(0.5)

                side = threading.Thread(target=urgent)
                time.sleep(1.0)
                side.start()
                for t in tickets:
                    client.result(t.id, timeout=600)
                elapsed = time.perf_counter() - start
                side.join()
    return len(items) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--urgent", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    items = texts(args.n)
    bare_rate = bare(items)
    route_rate, latencies = route(items, args.urgent)
    ordered = sorted(latencies)
    result: dict[str, Any] = {
        "n": args.n,
        "bare_texts_per_s": round(bare_rate, 1),
        "route_texts_per_s": round(route_rate, 1),
        "route_vs_bare": round(route_rate / bare_rate, 2),
        "urgent_p50_s": round(statistics.median(ordered), 3) if ordered else None,
        "urgent_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
        if ordered
        else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        "| texts | bare texts/s | whole route texts/s | route / bare | urgent p50 s | urgent p99 s |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['n']:,} | {result['bare_texts_per_s']} | {result['route_texts_per_s']} | "
        f"{result['route_vs_bare']} | {result['urgent_p50_s']} | {result['urgent_p99_s']} |"
    )


if __name__ == "__main__":
    main()
