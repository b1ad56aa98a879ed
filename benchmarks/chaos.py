"""Chaos: thousands of requests across all three routes while workers and Redis are killed.

Everything is real: an embedded Redis with AOF (``appendfsync everysec``), the sandbox provider
over loopback HTTP injecting 429s, 500s, hanging calls, failing batch lines and one window of
expiring batches, Celery workers (service, GPU on the CPU, a producer's callback worker) and
beat as subprocesses. While the requests drain:

* a service or GPU worker is SIGKILLed every ``--kill-every`` seconds and started again;
* Redis is SIGKILLed once, mid-run, and restarted on the same port and data directory.

Every request is submitted (and fsynced: the run waits two seconds) before the first kill, so
the figures measure the promise for acknowledged, persisted requests. The report counts:

* lost: a request that never reached a final state, or whose hash is gone;
* answered twice: a request whose stored answer changed after it was first seen finished;
* delivered twice: requests the producer's callback task received more than once. Delivery is
  at-least-once: a worker killed between "sent" and "marked delivered" sends again, and the
  request id is the receiver's idempotency key; this counts the resends, it does not hide them.

    .venv/bin/python -m benchmarks.chaos --n 3000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from routing.client import Client
from routing.decide.lanes import parse_lanes
from routing.errors import NotFound, StoreUnavailable
from routing.models import ServiceConfig
from routing.sandbox import Knobs
from routing.states import FINISHED, State
from routing.store.embedded import EmbeddedRedis
from tasks.cli.demo import demo_workload
from tasks.cli.stack import LocalStack
from tests.callback_app import counts_key
from tests.test_e2e import CALLBACK, FAST

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos"
ENV = {
    **FAST,
    "MIXBATCH_LEASE_S": "20",
    "MIXBATCH_GPU_CHUNK": "16",
    "MIXBATCH_BATCH_INTENT_GRACE_S": "10",
    "MIXBATCH_BATCH_COLLECT_LEASE_S": "20",
}
KNOBS = Knobs(
    latency_ms=5,
    rate_429=0.05,
    retry_after_s=0.2,
    rate_500=0.03,
    rate_timeout=0.01,
    hang_s=3.0,
    seed=7,
    # an hour of sandbox time per real second: batches end in about a second, and an expiring
    # batch (24 h) expires after about 24 s instead of a day
    time_scale=3600.0,
    batch_turnaround_s=3600.0,
    batch_line_fail_rate=0.04,
    batch_expire_done_fraction=0.5,
)
KILLABLE = ("worker", "gpu")


class Chaos:
    """The stack, the killer thread and the bookkeeping of one run."""

    def __init__(self, tmp: Path, kill_every_s: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kill_every_s = kill_every_s
        self.redis = EmbeddedRedis(tmp / "redis", appendfsync="everysec").start()
        self.stack = LocalStack(
            tmp / "stack", redis_url=self.redis.url, namespace=NAMESPACE, knobs=KNOBS, env=ENV
        )
        self.kills: Counter[str] = Counter()
        self.redis_down_s = 0.0
        self._stop = threading.Event()
        self._killer = threading.Thread(target=self._kill_loop, name="chaos-killer", daemon=True)

    def start(self, config: ServiceConfig) -> None:
        self.stack.start()
        self.stack.publish(config)
        self._start("worker")
        self._start("gpu")
        self.stack.start_worker(
            "callbacks", queues=["e2e.callbacks"], concurrency=2, app="tests.callback_app", cwd=ROOT
        )
        self.stack.start_beat()
        self.stack.wait_workers(["worker", "gpu", "callbacks"], timeout_s=240)

    def _start(self, name: str) -> None:
        if name == "gpu":
            self.stack.start_gpu_worker("gpu")
        else:
            self.stack.start_worker(name, concurrency=2)

    def unleash(self) -> None:
        self._killer.start()

    def _kill_loop(self) -> None:
        rounds = 0
        while not self._stop.wait(self.kill_every_s):
            rounds += 1
            if rounds == 3:
                self._kill_redis()
                continue
            if rounds in (2, 5) and self.stack.sandbox is not None:
                self.stack.sandbox.configure(batch_expire=rounds == 2)
            name = self.rng.choice(KILLABLE)
            with contextlib.suppress(KeyError):
                self.stack.kill(name)
                self.kills[name] += 1
                self._start(name)

    def _kill_redis(self) -> None:
        started = time.monotonic()
        self.redis.kill()
        time.sleep(1.0)
        self.redis.restart()
        self.redis_down_s = time.monotonic() - started
        self.kills["redis"] += 1

    def calm(self) -> None:
        """No more kills (the run is drained or out of time)."""
        self._stop.set()

    def stop(self) -> None:
        self.calm()
        if self._killer.is_alive():
            self._killer.join(timeout=30)
        self.stack.stop()
        self.redis.stop()


def _states(client: Client, ids: list[str]) -> dict[str, tuple[State | None, float | None]]:
    out: dict[str, tuple[State | None, float | None]] = {}
    for rid in ids:
        try:
            res = client.store.result(rid)
        except (NotFound, StoreUnavailable):  # gone, or Redis restarting: not final (yet)
            out[rid] = (None, None)
            continue
        out[rid] = (res.status, res.finished_at) if res is not None else (None, None)
    return out


def run(n: int, kill_every_s: float, timeout_s: float, seed: int) -> dict[str, Any]:
    config = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
    items = [{**i, "callback": CALLBACK} for i in demo_workload(n, local=True)]
    with tempfile.TemporaryDirectory(prefix="mixbatch-chaos-") as tmp:
        chaos = Chaos(Path(tmp), kill_every_s, seed)
        try:
            chaos.start(config)
            with Client(chaos.redis.url, namespace=NAMESPACE, config=config) as client:
                ids = [t.id for t in client.submit_many(items)]
                time.sleep(2.0)  # past appendfsync everysec: every ticket is on disk
                started = time.monotonic()
                chaos.unleash()
                first: dict[str, float | None] = {}
                changed: set[str] = set()
                end = time.monotonic() + timeout_s
                pending = set(ids)
                while pending and time.monotonic() < end:
                    for rid, (state, finished_at) in _states(client, sorted(pending)).items():
                        if state in FINISHED or state is State.DELIVERED:
                            first.setdefault(rid, finished_at)
                            pending.discard(rid)
                    time.sleep(0.5)
                drained_s = time.monotonic() - started
                chaos.calm()
                time.sleep(3.0)  # let the last deliveries land before counting them
                final = _states(client, ids)
                for rid, (_, finished_at) in final.items():
                    if rid in first and finished_at != first[rid]:
                        changed.add(rid)
                outcomes = Counter(str(s) for s, _ in final.values())
            sent = _sent_counts(chaos.redis.url)
        finally:
            chaos.stop()
    lost = sum(1 for s, _ in final.values() if s is None)
    return {
        "n": n,
        "lost": lost,
        "answered_twice": len(changed),
        "delivered_twice": sum(1 for c in sent.values() if c > 1),
        "never_delivered": sum(1 for rid in ids if sent.get(rid, 0) == 0),
        "outcomes": dict(outcomes),
        "kills": dict(chaos.kills),
        "redis_down_s": round(chaos.redis_down_s, 2),
        "drain_s": round(drained_s, 1),
        "deliveries_per_request_median": statistics.median(sent.values()) if sent else 0,
    }


def _sent_counts(url: str) -> dict[str, int]:
    r = redis.Redis.from_url(url)
    try:
        return {k.decode(): int(v) for k, v in r.hgetall(counts_key(NAMESPACE)).items()}
    finally:
        r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.n, args.kill_every, args.timeout, args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        "| requests | lost | answered twice | delivered twice | never delivered | drain s | kills |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {report['n']:,} | {report['lost']} | {report['answered_twice']} "
        f"| {report['delivered_twice']} | {report['never_delivered']} | {report['drain_s']} "
        f"| {report['kills']} |"
    )


if __name__ == "__main__":
    main()
