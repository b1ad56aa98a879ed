"""Read-only views of the running service: ``mixbatch lanes``, ``costs``, ``top`` and ``health``.

    mixbatch lanes [--json]                          depth, oldest age, nearest deadline per lane
    mixbatch costs [--json] [--plot PNG [--hours N]] spend and savings by route, lane, tenant, tag
    mixbatch top [--once | --json] [--interval S]    live view: lanes, routes, batches, savings
    mixbatch health [--json] [--wait S]              0 healthy; 3 Redis down; 1 workers or beat

All of them only read Redis, so they run anywhere the service's ``MIXBATCH_*`` environment is
set, and a restart of any worker changes none of their numbers.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from config.ops import load_ops_settings
from routing.errors import MixbatchError
from routing.store.base import redact_url
from tasks.cli.handles import load_settings, open_client, open_observer
from tasks.cli.observability import OUTCOMES, Health, Observer, Snapshot, check_health
from tasks.cli.output import age, console, err_console, example, print_json


@click.command()
@click.option("--json", "as_json", is_flag=True)
@example("lanes")
def lanes(as_json: bool) -> None:
    """Depth, oldest age and nearest deadline of every lane."""
    with open_client() as client:
        specs = client.config.by_priority()
        stats = [client.store.lane_stats(spec.name) for spec in specs]
    if as_json:
        print_json([s.model_dump() for s in stats])
        return
    table = Table(title="lanes")
    for col in (
        "lane",
        "priority",
        "queued",
        "delayed",
        "leased",
        "oldest",
        "nearest deadline",
        "max_queued",
    ):
        table.add_column(col, justify="left" if col == "lane" else "right")
    for spec, s in zip(specs, stats, strict=True):
        table.add_row(
            s.lane, str(spec.priority), str(s.depth), str(s.delayed), str(s.leased),
            age(s.oldest_age_s), age(s.nearest_deadline_s), str(spec.max_queued),
        )  # fmt: skip
    console.print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--plot",
    "plot_to",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="also draw spend and savings per hour by route to this PNG (extra: mixbatch[plot])",
)
@click.option("--hours", default=168, show_default=True, type=click.IntRange(1, 744))
@example("costs")
def costs(as_json: bool, plot_to: Path | None, hours: int) -> None:
    """Spend by lane, tenant, spend tag and route, priced from the providers' usage with
    config/prices.toml (the GPU route: its busy time at MIXBATCH_ROUTE_GPU_USD_PER_HOUR), and
    what each route saved against synchronous prices."""
    from routing.store.ledger import series, totals

    with open_client() as client:
        data = totals(client.store)
        by_hour = series(client.store, hours) if plot_to is not None else []
    if plot_to is not None:
        from tasks.cli.plot import plot_costs

        plot_costs(by_hour, plot_to)
        err_console.print(f"wrote {plot_to} ({len(by_hour)} hours with spend, last {hours})")
    if as_json:
        print_json(data)
        return
    if not data:
        console.print("no finished requests priced yet")
        return
    for group, title in (
        ("all", "total"),
        ("route", "by route (the tier that answered: batch, flex, realtime, priority, gpu)"),
        ("lane", "by lane"),
        ("tenant", "by tenant"),
        ("tag", "by spend tag"),
    ):
        rows = data.get(group)
        if not rows:
            continue
        table = Table(title=title)
        for col in (group if group != "all" else "", "requests", "cost USD", "saved USD"):
            table.add_column(col, justify="left" if col in (group, "") else "right")
        for name, row in sorted(rows.items()):
            table.add_row(name, f"{row['count']:.0f}", f"{row['cost']:.4f}", f"{row['saved']:.4f}")
        console.print(table)


# -- top -------------------------------------------------------------------------------------


def _usd(value: float) -> str:
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def _rates(snap: Snapshot, prev: Snapshot | None) -> dict[str, float | None]:
    """Finished requests per second per lane since the previous frame."""
    if prev is None or snap.at <= prev.at:
        return {lane.lane: None for lane in snap.lanes}
    before = {lane.lane: lane.finished_total for lane in prev.lanes}
    dt = snap.at - prev.at
    return {
        lane.lane: max(lane.finished_total - before.get(lane.lane, lane.finished_total), 0) / dt
        for lane in snap.lanes
    }


def render_top(
    snap: Snapshot, *, prev: Snapshot | None = None, where: str = "", error: str | None = None
) -> RenderableType:
    """One frame of ``mixbatch top`` (pure: a snapshot in, rich renderables out)."""
    stamp = datetime.fromtimestamp(snap.at, UTC).strftime("%H:%M:%S UTC")
    sweep = "never" if snap.last_sweep_at is None else f"{age(snap.at - snap.last_sweep_at)} ago"
    head = Text.assemble(
        ("mixbatch top", "bold"),
        f"  {stamp}  {where}  last sweep {sweep}",
    )
    parts: list[RenderableType] = [head]
    if error:
        parts.append(Text(f"{error} (showing the last good frame)", style="red"))

    lanes = Table(title="lanes", title_justify="left", expand=False)
    for col in (
        "lane", "queued", "delayed", "leased", "oldest", "min slack",
        *OUTCOMES, "misses", "retries", "done/s",
    ):  # fmt: skip
        lanes.add_column(col, justify="left" if col == "lane" else "right")
    rates = _rates(snap, prev)
    for lane in snap.lanes:
        by_outcome = {o: sum(r.get(o, 0) for r in lane.finished.values()) for o in OUTCOMES}
        rate = rates.get(lane.lane)
        slack = age(lane.min_slack_s)
        lanes.add_row(
            lane.lane,
            str(lane.depth),
            str(lane.delayed),
            str(lane.leased),
            age(lane.oldest_age_s),
            Text(slack, style="red") if (lane.min_slack_s or 0) < 0 else slack,
            *[str(by_outcome[o]) for o in OUTCOMES],
            Text(str(lane.deadline_misses), style="red" if lane.deadline_misses else ""),
            str(lane.retries_total),
            "-" if rate is None else f"{rate:.1f}",
        )
    parts.append(lanes)

    routes = Table(title="routes (finished, all lanes)", title_justify="left")
    for col in ("route", *OUTCOMES, "cost", "saved"):
        routes.add_column(col, justify="left" if col == "route" else "right")
    names = sorted({r for lane in snap.lanes for r in lane.finished} | set(snap.costs_by_route))
    for route in names:
        counts = {
            o: sum(lane.finished.get(route, {}).get(o, 0) for lane in snap.lanes) for o in OUTCOMES
        }
        cost = snap.costs_by_route.get(route)
        routes.add_row(
            route,
            *[str(counts[o]) for o in OUTCOMES],
            _usd(cost.cost_usd) if cost else "-",
            _usd(cost.saved_usd) if cost else "-",
        )
    parts.append(routes)

    batches = Table(title="provider batches in flight", title_justify="left")
    for col in ("provider", "batch id", "model", "lines", "lanes", "status", "age", "slack"):
        batches.add_column(col, justify="right" if col in ("lines", "age", "slack") else "left")
    for b in sorted(snap.batches, key=lambda b: b.tightest_deadline or float("inf")):
        batches.add_row(
            b.provider,
            b.batch_id or "(creating)",
            b.model,
            str(b.lines),
            ",".join(b.lanes),
            b.last_status or b.state,
            age(snap.at - b.submitted_at) if b.submitted_at else "-",
            age(b.tightest_deadline - snap.at) if b.tightest_deadline else "-",
        )
    if not snap.batches:
        batches.caption = "none in flight"
    parts.append(batches)

    misses = sum(lane.deadline_misses for lane in snap.lanes)
    parts.append(
        Text.assemble(
            ("spent ", "bold"),
            _usd(snap.cost_usd_total),
            ("  saved by batching ", "bold"),
            (_usd(snap.saved_usd_total), "green"),
            ("  deadline misses ", "bold"),
            (str(misses), "red" if misses else ""),
            ("  staged for batches ", "bold"),
            str(snap.staged),
            ("  dead letters ", "bold"),
            (str(snap.dead_letters), "red" if snap.dead_letters else ""),
        )
    )
    return RichGroup(*parts)


@click.command()
@click.option("--interval", default=1.0, show_default=True, help="seconds between frames")
@click.option("--once", is_flag=True, help="print one frame and exit")
@click.option("--json", "as_json", is_flag=True, help="print one snapshot as JSON and exit")
@example("top")
def top(interval: float, once: bool, as_json: bool) -> None:
    """A live view of the service: lanes (depth, oldest, slack, outcomes, misses, throughput),
    routes with their cost, provider batches in flight, and what batching saved."""
    if interval <= 0:
        raise click.BadParameter("must be above 0", param_hint="--interval")
    observer, store = open_observer()
    where = redact_url(store.url)
    try:
        snap = observer.snapshot()
        if as_json:
            print_json(snap.model_dump(mode="json"))
            return
        if once:
            console.print(render_top(snap, where=where))
            return
        _live(observer, snap, where, interval)
    finally:
        store.close()


def _live(observer: Observer, snap: Snapshot, where: str, interval: float) -> None:
    """Refresh until Ctrl-C (or SIGTERM); a Redis outage shows in red and the view keeps trying.

    The signals only set a flag, checked between frames: an interrupt never lands in the middle
    of a Redis call or a render, so the view always stops cleanly with exit status 0.
    """
    import threading

    from rich.live import Live

    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    prev: Snapshot | None = None
    try:
        with Live(render_top(snap, where=where), console=console, auto_refresh=False) as live:
            while not stop.wait(interval):
                error = None
                try:
                    prev, snap = snap, observer.snapshot()
                except MixbatchError as exc:
                    error = str(exc)
                live.update(render_top(snap, prev=prev, where=where, error=error), refresh=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- health ----------------------------------------------------------------------------------


def _health_once(timeout_s: float) -> Health:
    s = load_settings()
    return check_health(
        s.store_url,
        broker=s.broker_url,
        broker_options=s.broker_transport_options,
        namespace=s.namespace,
        sweep_interval_s=s.sweep_interval_s,
        timeout_s=timeout_s,
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print every check as JSON")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=None,
    help="seconds to wait for workers to answer (default MIXBATCH_HEALTH_TIMEOUT_S, 2)",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=0.0,
    show_default=True,
    help="retry for up to this many seconds until healthy (for start-up probes)",
)
@example("health")
def health(as_json: bool, timeout_s: float | None, wait_s: float) -> None:
    """Exit 0 when Redis answers, every service queue has a worker that answers a ping, and
    beat's sweep ran within 3 sweep intervals; otherwise print the reason and exit 3 (Redis
    unreachable) or 1 (workers or beat)."""
    timeout = timeout_s if timeout_s is not None else load_ops_settings().health_timeout_s
    end = time.monotonic() + wait_s
    while True:
        result = _health_once(timeout)
        if result.ok or time.monotonic() >= end:
            break
        time.sleep(min(1.0, max(end - time.monotonic(), 0.0)))
    code = 0 if result.ok else (1 if result.redis_ok else 3)
    if as_json:
        print_json({**result.model_dump(), "exit_code": code})
    else:
        for check in result.checks:
            mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
            console.print(f"{mark} {check.name:<8} {check.detail}", highlight=False)
        if not result.ok:
            err_console.print(f"[red]unhealthy:[/] {result.reason()}", highlight=False)
    sys.exit(code)
