"""Provider-batch planning and file building: throughput and memory against the chunk size.

The aggregator plans every claimed request into provider batches (group, order by deadline,
dedupe, chunk within the provider's caps) and streams each batch's file to a temporary file
before uploading it. This measures that pure part alone, on synthetic claimed requests, for
several chunk sizes (``target_bytes``):

1. throughput: requests/s of ``plan_batches`` plus writing every batch's input file (the
   adapters' ``write_input``: OpenAI JSONL, Anthropic create items) into a ``tempfile``, the
   garbage collector on, median of ``--repeat`` runs; timed without tracemalloc, which slows
   allocation severalfold. Wall-clock req/s is the goal's figure; req per CPU-second is printed
   beside it because on a shared machine other processes' load shows in the first and hardly
   in the second;
2. memory: with tracemalloc, the peak while planning, what the plan keeps (its fanout and id
   lists: per request, not per chunk), and the peak while building the files, which is what
   must stay bounded by the chunk: the builders hold one line at a time.

The workload is realistic small chat traffic: 80 % OpenAI chat (``gpt-4o-mini``), 20 %
Anthropic messages (``claude-haiku-4-5``), about 700 bytes a body, deadlines spread over the
three default lanes, and 2 % exact repeats of an earlier request (which dedupe folds).

    .venv/bin/python benchmarks/provider_batch_plan.py            # markdown table
    .venv/bin/python benchmarks/provider_batch_plan.py --json
    .venv/bin/python benchmarks/provider_batch_plan.py --n 20000 --targets 1,5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pydantic

from routing.decide.planner import (
    ANTHROPIC_CAPS,
    OPENAI_CAPS,
    BatchCaps,
    BatchProtocol,
    Plan,
    PlannedBatch,
    file_overhead,
    plan_batches,
)
from routing.decide.route import provider_for
from routing.keys import new_request_id
from routing.models import Claimed, Endpoint, Prepared
from routing.providers.batch import batch_adapter_class

MIB = 1024 * 1024
THROUGHPUT_GOAL = 50_000.0
"""Requests/s that planning plus building must reach at every chunk size."""
MEMORY_GOAL = 2.0
"""Peak memory while building the files, at most this multiple of one chunk."""
NOW = 1_800_000_000.0
LANES = (("urgent", 60.0, 0.1), ("standard", 3600.0, 0.4), ("bulk", 86_400.0, 0.5))
SYSTEM_PROMPT = (
    "You are a support analyst. Summarise the customer's ticket in two sentences, then give "
    "its category (billing, bug, how-to, account) and an urgency from 1 to 5 as JSON."
)
TICKET_TEMPLATE = (
    "Ticket #{i}: Hi, since this morning the export button on the reports page spins forever "
    "and the CSV never downloads. I tried Chrome and Firefox and cleared the cache. We need "
    "the monthly figures for a board meeting tomorrow. Account {account}, plan Team."
)
PROTOCOLS: dict[str, BatchProtocol] = {"openai": "openai", "anthropic": "anthropic"}
CAPS: dict[str, BatchCaps] = {"openai": OPENAI_CAPS, "anthropic": ANTHROPIC_CAPS}


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays a clean table or JSON document."""
    print(message, file=sys.stderr, flush=True)


def make_body(i: int, anthropic: bool) -> dict[str, Any]:
    ticket = TICKET_TEMPLATE.format(i=i, account=10_000 + i)
    if anthropic:
        return {
            "model": "claude-haiku-4-5",
            "system": SYSTEM_PROMPT,
            "messages": [{"role": "user", "content": ticket}],
            "max_tokens": 200,
        }
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket},
        ],
        "max_tokens": 200,
        "temperature": 0.2,
    }


def make_items(n: int, seed: int = 0) -> list[Claimed]:
    """``n`` claimed requests, built and validated as the store would hand them over."""
    rng = random.Random(seed)
    lanes = [name for name, _, _ in LANES]
    weights = [share for _, _, share in LANES]
    deadline_s = {name: d for name, d, _ in LANES}
    items: list[Claimed] = []
    for i in range(n):
        lane = rng.choices(lanes, weights)[0]
        anthropic = rng.random() < 0.2
        source = rng.randrange(i) if i and rng.random() < 0.02 else i
        body = make_body(source, anthropic)
        request = Prepared(
            tenant=f"team-{i % 7}",
            custom_id=f"ticket-{i}",
            lane=lane,
            deadline=NOW + rng.uniform(0.1, 1.0) * deadline_s[lane],
            endpoint=Endpoint.MESSAGES if anthropic else Endpoint.CHAT,
            model=body["model"],
            body=body,
            metadata={"team": "support"},
            callback=None,
            max_attempts=3,
            created_at=NOW,
        )
        request_id = new_request_id(lane, NOW + i / 1000)
        items.append(Claimed(id=request_id, token=f"t{i}", attempts=1, request=request))
    return items


def plan(items: list[Claimed], target_bytes: int) -> Plan:
    return plan_batches(
        items,
        provider_of=provider_for,
        protocol_of=PROTOCOLS.__getitem__,
        caps_of=CAPS.__getitem__,
        target_bytes=target_bytes,
    )


def build(batch: PlannedBatch, lookup: Callable[[str], Prepared]) -> int:
    """Write one batch's file as the submit task would: into a temporary file on disk."""
    with tempfile.TemporaryFile() as fh:
        written = batch_adapter_class(batch.protocol).write_input(batch, lookup, fh)
    if written + file_overhead(batch.protocol) != batch.estimated_bytes:
        raise RuntimeError(f"batch {batch.key}: wrote {written}, planned {batch.estimated_bytes}")
    return written


def timed(items: list[Claimed], lookup: Callable[[str], Prepared], target: int) -> dict[str, Any]:
    """One throughput run, GC on (a real aggregator pays for its collections too)."""
    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    result = plan(items, target)
    planned = time.perf_counter()
    written = sum(build(batch, lookup) for batch in result.batches)
    done = time.perf_counter()
    cpu_s = time.process_time() - cpu_started
    return {
        "plan_s": planned - started,
        "build_s": done - planned,
        "rps": len(items) / (done - started),
        "cpu_rps": len(items) / cpu_s,
        "batches": len(result.batches),
        "lines": sum(b.line_count for b in result.batches),
        "bytes": written,
        "largest_batch_bytes": max(b.estimated_bytes for b in result.batches),
        "rejected": len(result.rejected),
    }


def memory(items: list[Claimed], lookup: Callable[[str], Prepared], target: int) -> dict[str, int]:
    """Peaks above the baseline of the items themselves, which the caller holds anyway."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = plan(items, target)
    kept, plan_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for batch in result.batches:
        build(batch, lookup)
    build_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "plan_peak_bytes": plan_peak - base,
        "plan_kept_bytes": kept - base,
        "build_peak_bytes": build_peak - kept,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    log(f"building {args.n:,} claimed requests")
    items = make_items(args.n)
    lookup = {c.id: c.request for c in items}.__getitem__
    plan(items[:1000], MIB)
    rows: list[dict[str, Any]] = []
    for target_mb in args.targets:
        target = int(target_mb * MIB)
        runs = [timed(items, lookup, target) for _ in range(args.repeat)]
        mem = memory(items, lookup, target)
        rps = statistics.median(r["rps"] for r in runs)
        row = {
            "target_bytes": target,
            "rps": {"median": rps, "runs": [r["rps"] for r in runs]},
            "cpu_rps": {
                "median": statistics.median(r["cpu_rps"] for r in runs),
                "runs": [r["cpu_rps"] for r in runs],
            },
            "plan_s": statistics.median(r["plan_s"] for r in runs),
            "build_s": statistics.median(r["build_s"] for r in runs),
            **{k: runs[0][k] for k in ("batches", "lines", "bytes", "largest_batch_bytes")},
            "rejected": runs[0]["rejected"],
            **mem,
            "plan_kept_bytes_per_request": mem["plan_kept_bytes"] / args.n,
            "build_peak_per_chunk": mem["build_peak_bytes"] / target,
        }
        row["met"] = rps >= THROUGHPUT_GOAL and row["build_peak_per_chunk"] <= MEMORY_GOAL
        rows.append(row)
        log(
            f"target {target_mb:g} MiB: {rps:,.0f} req/s "
            f"({row['cpu_rps']['median']:,.0f} per CPU-second), {row['batches']} batches, "
            f"build peak {mem['build_peak_bytes'] / MIB:.2f} MiB, "
            f"plan kept {mem['plan_kept_bytes'] / MIB:.1f} MiB"
        )
    return {
        "benchmark": "provider_batch_plan",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "pydantic": pydantic.VERSION,
        },
        "params": {"n": args.n, "repeat": args.repeat, "targets_mib": args.targets},
        "goals": {
            "rps": f">= {THROUGHPUT_GOAL:,.0f}",
            "build_peak": f"<= {MEMORY_GOAL:g} x target_bytes",
        },
        "rows": rows,
    }


def markdown(doc: dict[str, Any]) -> str:
    """The table docs/benchmarks.md quotes: medians, every run alongside for spread."""
    p = doc["params"]
    lines = [
        f"Planning and file building for {p['n']:,} queued requests "
        f"(median of {p['repeat']}; Python {doc['machine']['python']}, "
        f"{doc['machine']['cpus']} CPUs, 1-minute load {doc['machine']['load_1m'][0]:g} before "
        f"and {doc['machine']['load_1m'][1]:g} after).",
        "",
        "| target chunk | batches | req/s (runs) | req/CPU-s | plan s | build s | build peak "
        "| peak / chunk | plan peak | plan kept (per request) | goal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["rows"]:
        runs = ", ".join(f"{r:,.0f}" for r in row["rps"]["runs"])
        lines.append(
            f"| {row['target_bytes'] / MIB:g} MiB | {row['batches']} "
            f"| **{row['rps']['median']:,.0f}** ({runs}) | {row['cpu_rps']['median']:,.0f} "
            f"| {row['plan_s']:.3f} | {row['build_s']:.3f} "
            f"| {row['build_peak_bytes'] / MIB:.2f} MiB | {row['build_peak_per_chunk']:.3f} "
            f"| {row['plan_peak_bytes'] / MIB:.1f} MiB "
            f"| {row['plan_kept_bytes'] / MIB:.1f} MiB ({row['plan_kept_bytes_per_request']:.0f} B) "
            f"| {'met' if row['met'] else 'NOT met'} |"
        )
    first = doc["rows"][0]
    lines += [
        "",
        f"{first['lines']:,} lines after dedupe, {first['bytes'] / MIB:.1f} MiB of files in all; "
        f"goals: {doc['goals']['rps']} req/s, build peak {doc['goals']['build_peak']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="queued requests")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per chunk size")
    parser.add_argument(
        "--targets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[1.0, 5.0, 20.0],
        help="chunk sizes (target_bytes) in MiB, comma-separated",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    doc = measure(args)
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0 if all(row["met"] for row in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
