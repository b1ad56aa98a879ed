"""Operations commands: ``mixbatch top``, ``health``, ``metrics`` and ``flower``.

    mixbatch top [--once | --json] [--interval S]   live view: lanes, routes, batches, savings
    mixbatch health [--json] [--wait S]              0 healthy; 3 Redis down; 1 workers or beat
    mixbatch metrics [--port N] [--once]             the Prometheus endpoint (tasks.cli.metrics)
    mixbatch flower [--address A] [--port N]         Flower, refusing a public bind without auth

All of them read Redis only (``tasks.cli.observability``), so they run anywhere the service's
``MIXBATCH_*`` environment is set, and a restart of any worker changes none of their numbers.
Errors go through the ``mixbatch`` group: one line, and the exit codes of ``tasks.cli.main``.
"""

from __future__ import annotations

import inspect
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

import click
from rich.console import Console, RenderableType
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from config.ops import load_ops_settings
from routing.errors import MixbatchError
from routing.store.embedded import redact_url
from routing.store.lanes import LaneStore
from tasks.cli.observability import OUTCOMES, Health, Observer, Snapshot, check_health

__all__ = ["OPS_EXAMPLES", "register_ops", "render_top"]

OPS_EXAMPLES = {
    "top": "mixbatch top                     # Ctrl-C to leave; --once or --json for scripts",
    "health": "mixbatch health --json          # exit 0 healthy, 3 Redis down, 1 otherwise",
    "metrics": "mixbatch metrics --port 9808    # then curl http://127.0.0.1:9808/metrics",
    "flower": "mixbatch flower --port 5555     # public address: set MIXBATCH_FLOWER_BASIC_AUTH",
}
console = Console()
err_console = Console(stderr=True)


# ``tasks.cli.main`` imports this module while it registers commands, so its helpers are imported
# when a command runs, not at import (``python -m tasks.cli.main`` would otherwise be circular).
def _settings() -> Any:
    from tasks.cli.main import _settings as load

    return load()


def _age(seconds: float | None) -> str:
    from tasks.cli.main import _age as age

    return age(seconds)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


F = TypeVar("F", bound=Callable[..., Any])


def example(name: str) -> Callable[[F], F]:
    """Append the command's example to its help, as ``tasks.cli.example`` does, but dedent
    the docstring first: otherwise click re-wraps its indented continuation lines with the
    indentation left inside the paragraph."""

    def wrap(fn: F) -> F:
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n\b\nExample:\n  {OPS_EXAMPLES[name]}"
        return fn

    return wrap


def _observer() -> tuple[Observer, LaneStore]:
    """A store built from this invocation's settings (never a cached one from another run)."""
    s = _settings()
    store = LaneStore.from_url(s.broker_url(), namespace=s.namespace, result_ttl_s=s.result_ttl_s)
    return Observer(store, fallback_lanes=lambda: s.lanes()), store


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
    sweep = "never" if snap.last_sweep_at is None else f"{_age(snap.at - snap.last_sweep_at)} ago"
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
        slack = _age(lane.min_slack_s)
        lanes.add_row(
            lane.lane,
            str(lane.depth),
            str(lane.delayed),
            str(lane.leased),
            _age(lane.oldest_age_s),
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
            _age(snap.at - b.submitted_at) if b.submitted_at else "-",
            _age(b.tightest_deadline - snap.at) if b.tightest_deadline else "-",
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
    observer, store = _observer()
    where = redact_url(store.url)
    try:
        snap = observer.snapshot()
        if as_json:
            _print_json(snap.model_dump(mode="json"))
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
    s = _settings()
    return check_health(
        s.broker_url,
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
        _print_json({**result.model_dump(), "exit_code": code})
    else:
        for check in result.checks:
            mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
            console.print(f"{mark} {check.name:<8} {check.detail}", highlight=False)
        if not result.ok:
            err_console.print(f"[red]unhealthy:[/] {result.reason()}", highlight=False)
    sys.exit(code)


# -- metrics ---------------------------------------------------------------------------------


@click.command()
@click.option("--port", type=int, default=None, help="default MIXBATCH_METRICS_PORT (9808)")
@click.option("--address", default=None, help="default MIXBATCH_METRICS_ADDRESS (127.0.0.1)")
@click.option("--once", is_flag=True, help="print what a scrape would get and exit")
@example("metrics")
def metrics(port: int | None, address: str | None, once: bool) -> None:
    """Serve the Prometheus endpoint (/metrics): lane depth, age and slack, requests by lane,
    route and outcome, deadline misses, batches in flight, cost and savings. Everything is
    read from Redis on each scrape, so counters survive restarts of any process."""
    from tasks.cli.metrics import build_registry, render_text, serve

    ops = load_ops_settings()
    observer, store = _observer()
    registry = build_registry(lambda: observer, lambda: _settings().providers)
    if once:
        try:
            observer.snapshot()  # a scripted caller wants the error, not `redis_up 0`
            sys.stdout.write(render_text(registry))
        finally:
            store.close()
        return
    variable = "--port" if port is not None else "MIXBATCH_METRICS_PORT"
    port = ops.metrics_port if port is None else port
    address = ops.metrics_address if address is None else address
    server = serve(address, port, registry, variable)
    err_console.print(
        f"metrics at http://{address}:{server.server_port}/metrics (Redis {redact_url(store.url)})",
        highlight=False,
    )

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        store.close()


# -- flower ----------------------------------------------------------------------------------


@click.command()
@click.option("--address", default=None, help="default MIXBATCH_FLOWER_ADDRESS (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default MIXBATCH_FLOWER_PORT (5555)")
@example("flower")
def flower(address: str | None, port: int | None) -> None:
    """Run Flower (the Celery web UI) on the service's broker. A non-loopback address needs
    MIXBATCH_FLOWER_BASIC_AUTH=user:password; the password never appears on a command line."""
    from config.flower import run_flower

    ops = load_ops_settings()
    s = _settings()
    s.broker_url()  # no Redis to watch is a clear error here, not in Flower
    sys.exit(
        run_flower(ops, address=address, port=port, log_level=s.log_level, log_format=s.log_format)
    )


def register_ops(cli: click.Group) -> None:
    """Add the operations commands to the ``mixbatch`` group (called by ``tasks.cli.main``)."""
    for command in (top, health, metrics, flower):
        cli.add_command(command)
