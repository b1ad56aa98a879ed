"""The markdown table of ``benchmarks/enqueue.py``: what docs/benchmarks.md quotes.

Apart from the measuring so that each file stays short; it reads only the report's document.
"""

from __future__ import annotations

from typing import Any


def _runs(series: dict[str, Any], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in series["runs"])


def markdown(doc: dict[str, Any]) -> str:
    """The table docs/benchmarks.md quotes: medians, with every run alongside for spread."""
    bulk, lat = doc["bulk"], doc["latency_ms"]
    m_rps, c_rps = bulk["mixbatch_submit_many_rps"], bulk["celery_apply_async_rps"]
    m_lat, c_lat = lat["mixbatch_submit"], lat["celery_apply_async"]
    p = doc["params"]
    rows = [
        "| measurement | mixbatch | Celery `apply_async` | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| bulk throughput, req/s (n={p['n']:,}, chunk {p['chunk_size']}) "
        f"| {m_rps['median']:,.0f} | {c_rps['median']:,.0f} "
        f"| **{bulk['ratio']:.1f}x** | {bulk['goal']} ({'met' if bulk['met'] else 'NOT met'}) |",
        f"| bulk vs a raw pipeline (HSET + ZADD per request), req/s "
        f"| {m_rps['median']:,.0f} | raw: {bulk['raw_pipeline_rps']['median']:,.0f} "
        f"| **{bulk['of_raw']:.2f}** | {bulk['raw_goal']} "
        f"({'met' if bulk['raw_met'] else 'NOT met'}) |",
    ]
    for q in ("p50", "p95", "p99"):
        ratio = m_lat[q]["median"] / c_lat[q]["median"]
        goal = f"{lat['goal']} ({'met' if lat['met'] else 'NOT met'})" if q == "p50" else ""
        bold = f"**{ratio:.2f}x**" if q == "p50" else f"{ratio:.2f}x"
        rows.append(
            f"| single-call latency {q}, ms ({p['latency_calls']:,} calls) "
            f"| {m_lat[q]['median']:.3f} | {c_lat[q]['median']:.3f} | {bold} | {goal} |"
        )
    r = doc["redis"]
    notes = [
        "",
        f"Medians of {p['repeat']} repeats. Runs: submit_many {_runs(m_rps, ',.0f')} req/s; "
        f"apply_async {_runs(c_rps, ',.0f')} req/s; "
        f"raw pipeline {_runs(bulk['raw_pipeline_rps'], ',.0f')} req/s; "
        f"p50 submit {_runs(m_lat['p50'], '.3f')} ms; p50 apply_async {_runs(c_lat['p50'], '.3f')} ms.",
        f"Redis {r['version']} ({'embedded' if r['embedded'] else r['url']}), "
        f"appendonly {r['appendonly']}, appendfsync {r['appendfsync']}; "
        f"{doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}, "
        f"Celery {doc['machine']['celery']}, redis-py {doc['machine']['redis_py']}.",
    ]
    return "\n".join(rows + notes)
