"""What a simulated day reports, the invariants it must keep, and the command line.

The JSON shape is read by other tools and stays stable: ``{"config": ..., "reports": [...]}``,
each report with ``policy``, ``cost_usd`` and ``misses`` per lane (and more, added beside them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.sim.world import GPU_USD_PER_HOUR, LANES, WORLDS, Config, make_traffic

if TYPE_CHECKING:
    from benchmarks.sim.engine import Sim


def report(sim: Sim, wall_s: float, day_s: float) -> dict[str, Any]:
    lane = sim.tr.lane
    late = sim.delivered_at > sim.tr.deadline
    misses = {name: int(np.sum(late & (lane == i))) for i, name in enumerate(LANES)}
    totals = {name: int(np.sum(lane == i)) for i, name in enumerate(LANES)}
    cost = sum(sim.cost.values())
    always_on = GPU_USD_PER_HOUR * day_s / 3600.0 if sim.counts["gpu_requests"] else 0.0
    return {
        "policy": sim.policy,
        "world": sim.cfg.world,
        "n": sim.n,
        "cost_usd": cost,
        "cost_by_route": dict(sim.cost),
        "cost_by_lane": dict(zip(LANES, sim.cost_lane, strict=True)),
        # the GPU two ways: per busy hour (cost_usd) and as a machine kept on all day
        "gpu_busy_hours": sim.gpu_busy_s / 3600.0,
        "gpu_always_on_usd": always_on,
        "cost_usd_gpu_always_on": cost - sim.cost["gpu"] + always_on,
        "wasted_usd": sim.wasted,
        "misses": misses,
        "lane_requests": totals,
        "miss_rate": {k: misses[k] / totals[k] if totals[k] else 0.0 for k in LANES},
        "lost": int(np.sum(sim.deliveries == 0)),
        "delivered_twice": int(np.sum(sim.deliveries > 1)),
        "unanswered": int(np.sum(sim.answers == 0)),
        "answers": int(np.sum(sim.answers)),
        "undelivered_with_time": int(np.sum(np.isnan(sim.delivered_at) & (sim.deliveries > 0))),
        "late_counted": int(np.sum(late)),
        "routes": {
            name: int(np.sum(sim.final_route == code))
            for code, name in ((1, "realtime"), (2, "batch"), (3, "gpu"), (4, "flex"))
        },
        **sim.counts,
        "wall_s": wall_s,
    }


def check_invariants(report: dict[str, Any]) -> None:
    """No request lost, none delivered twice, every refused answer counted, misses add up."""
    assert report["lost"] == 0, f"{report['policy']}: {report['lost']} requests never delivered"
    assert report["delivered_twice"] == 0, f"{report['policy']}: delivered twice"
    assert report["unanswered"] == 0, f"{report['policy']}: requests without an answer"
    assert report["undelivered_with_time"] == 0
    assert report["answers"] == report["n"] + report["late_answers"], (
        f"{report['policy']}: answers {report['answers']} != requests {report['n']} "
        f"+ refused late answers {report['late_answers']}"
    )
    assert sum(report["misses"].values()) == report["late_counted"]
    assert sum(report["routes"].values()) == report["n"]


def simulate(policy: str, cfg: Config) -> dict[str, Any]:
    from benchmarks.sim.engine import Sim

    result = Sim(policy, make_traffic(cfg.n, cfg.seed), cfg).run()
    check_invariants(result)
    return result


def run_all(cfg: Config, policies: Sequence[str], jobs: int = 1) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [simulate(p, cfg) for p in policies]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(simulate, policies, [cfg] * len(policies)))


def _pct(x: float) -> str:
    return f"{x * 100:.3f} %"


def markdown(reports: list[dict[str, Any]]) -> str:
    by = {r["policy"]: r for r in reports}
    oracle = by.get("oracle", {}).get("cost_usd")
    realtime = by.get("all-realtime", {}).get("cost_usd")
    lines = [
        "| policy | cost (USD) | vs oracle | vs all-realtime | GPU always on | missed urgent "
        "| missed standard | missed bulk | realtime calls | flex calls (shed) | batch API calls "
        "| batches (expired, cancelled) | hedged | GPU requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        cost = r["cost_usd"]
        vs_oracle = f"{(cost / oracle - 1) * 100:+.1f} %" if oracle else "-"
        vs_rt = f"{(cost / realtime - 1) * 100:+.1f} %" if realtime else "-"
        m, rate = r["misses"], r["miss_rate"]
        lines.append(
            f"| {r['policy']} | {cost:,.2f} | {vs_oracle} | {vs_rt} "
            f"| {r['cost_usd_gpu_always_on']:,.2f} "
            + " ".join(f"| {m[k]:,} ({_pct(rate[k])})" for k in LANES)
            + f" | {r['realtime_calls']:,} | {r['flex_calls']:,} ({r['flex_shed']:,}) "
            f"| {r['batch_calls']:,} | {r['batches']:,} "
            f"({r['batches_expired']:,}, {r['batches_cancelled']:,}) | {r['hedged']:,} "
            f"| {r['gpu_requests']:,} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, doc: str = "") -> int:
    from benchmarks.sim.engine import POLICIES

    ap = argparse.ArgumentParser(description=(doc or __doc__ or "").split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="requests in the day")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--world", default="default", choices=WORLDS)
    ap.add_argument("--quantile", type=float, default=0.95)
    ap.add_argument("--margin", type=float, default=600.0, help="MIXBATCH_BATCH_MARGIN_S")
    ap.add_argument("--half-life", type=float, default=7200.0, help="MIXBATCH_ROUTE_HALF_LIFE_S")
    ap.add_argument("--refresh", type=float, default=60.0, help="simulated s between re-learns")
    ap.add_argument("--jobs", type=int, default=2, help="policies run in parallel processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (one of {', '.join(POLICIES)})")
    cfg = Config(
        n=args.n,
        seed=args.seed,
        world=args.world,
        quantile=args.quantile,
        refresh_s=args.refresh,
        margin_s=args.margin,
        half_life_s=args.half_life,
    )
    started = time.perf_counter()
    reports = run_all(cfg, policies, args.jobs)
    if args.json:
        json.dump({"config": cfg.__dict__, "reports": reports}, sys.stdout, indent=2)
        print()
    else:
        print(markdown(reports))
        print(
            f"\n{cfg.n:,} requests, seed {cfg.seed}, world {cfg.world}, "
            f"{time.perf_counter() - started:.0f} s"
        )
    return 0
