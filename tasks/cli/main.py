"""The ``mixbatch`` command.

Every command answers errors in one sentence that names the bad input (no traceback) and exits
non-zero: 2 for bad input or configuration, 3 when Redis cannot be reached, 4 for backpressure,
1 otherwise.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from routing.errors import (
    ConfigError,
    InvalidRequest,
    LaneFull,
    MalformedInput,
    MixbatchError,
    StoreUnavailable,
)

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

EXAMPLES = {
    "up": "mixbatch up                      # embedded Redis + worker, beat, flower",
    "demo": "mixbatch demo --requests 300",
    "submit": "mixbatch submit batch.jsonl --lane bulk --deadline 6h --wait",
    "status": "mixbatch status urgent.01JD3...   |   mixbatch status --json",
    "results": "mixbatch results --out answers.jsonl",
    "lanes": "mixbatch lanes --json",
    "sandbox": "mixbatch sandbox --port 8900 --latency-ms 50 --rate-429 0.05",
    "costs": "mixbatch costs --json",
}


def _exit_code(exc: MixbatchError) -> int:
    if isinstance(exc, InvalidRequest | ConfigError):
        return 2
    if isinstance(exc, StoreUnavailable):
        return 3
    if isinstance(exc, LaneFull):
        return 4
    return 1


class Group(click.Group):
    """Turns mixbatch's own errors into one red line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MixbatchError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(_exit_code(exc))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """mixbatch: mixed-priority batching of LLM and embedding requests.

    Requests wait in lanes (urgent, standard, bulk) with deadlines and run the cheapest way
    that still meets them. With MIXBATCH_REDIS_URL unset, an embedded Redis is used.
    """


def example(name: str) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n\b\nExample:\n  {EXAMPLES[name]}"
        return fn

    return wrap


def _settings() -> Any:
    from pydantic import ValidationError

    from config.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "MIXBATCH_" + ".".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"{name}: {first['msg']} (got {first.get('input')!r})") from None


def _client() -> Any:
    from routing.client import Client

    s = _settings()
    return Client(s.broker_url(), namespace=s.namespace, config=s.service_config())


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 120:
        return f"{sign}{s:.0f}s"
    if s < 7200:
        return f"{sign}{s / 60:.0f}m"
    return f"{sign}{s / 3600:.1f}h"


@cli.command()
@click.option(
    "--procfile", type=click.Path(dir_okay=False, path_type=Path), default=Path("Procfile")
)
@example("up")
def up(procfile: Path) -> None:
    """Run the whole service in the foreground: embedded Redis if needed, then every
    process of the Procfile (through honcho). Ctrl-C stops all of them."""
    from honcho.environ import parse_procfile
    from honcho.manager import Manager

    from routing.store.embedded import ensure_running

    if not procfile.exists():
        raise ConfigError(
            f"no Procfile at {procfile}; run from the project directory or pass --procfile"
        )
    s = _settings()
    owned = None
    url = s.redis_url
    if not url:
        url, owned = ensure_running(s.data_dir, appendfsync=s.embedded_fsync)
        console.print(f"embedded Redis at {url} (data in {s.data_dir}/, AOF on)")
    os.environ["MIXBATCH_REDIS_URL"] = url
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    from config.settings import reset_settings

    reset_settings()
    from tasks.runtime import store

    store().publish_config(_settings().service_config())
    manager = Manager()
    for name, proc in parse_procfile(procfile.read_text()).processes.items():
        manager.add_process(name, proc, env=dict(os.environ))
    try:
        manager.loop()
    finally:
        if owned is not None:
            owned.stop()
    sys.exit(manager.returncode or 0)


@cli.command()
@click.option("--requests", "n", default=300, show_default=True, help="size of the sample workload")
@click.option("--timeout", "timeout_s", default=180.0, show_default=True, help="seconds to wait")
@example("demo")
def demo(n: int, timeout_s: float) -> None:
    """The main job end to end, offline: embedded Redis, the sandbox provider, a worker and
    beat; submits a mixed-lane workload with a progress bar, waits, prints a summary."""
    from tasks.cli.demo import run_demo

    sys.exit(run_demo(_settings().data_dir, n=n, timeout_s=timeout_s, console=console))


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lane", default="standard", show_default=True)
@click.option(
    "--deadline", default=None, help="relative (90s, 15m, 6h, 1d) or ISO time; default: the lane's"
)
@click.option("--tenant", default="default", show_default=True)
@click.option("--wait", is_flag=True, help="wait for every answer, with a progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the tickets as JSON")
@example("submit")
def submit(
    file: Path, lane: str, deadline: str | None, tenant: str, wait: bool, as_json: bool
) -> None:
    """Enqueue a file in the OpenAI batch input format (custom_id, method, url, body).

    The whole file is checked first: a bad line is named and nothing is enqueued."""
    from routing.jsonl import read_batch_file

    with file.open() as fh:
        lines = read_batch_file(fh, source=str(file))
    items = [
        {
            "custom_id": ln.custom_id,
            "endpoint": ln.url,
            "body": ln.body,
            "lane": lane,
            "deadline": deadline,
            "tenant": tenant,
        }
        for ln in lines
    ]
    with _client() as client:
        client.config.lane(lane)
        try:
            client.prepare_many(items)
        except InvalidRequest as exc:
            index = int(str(exc.field).removeprefix("items[").removesuffix("]"))
            message = str(exc).split(": ", 1)[1]
            raise MalformedInput(message, line=lines[index].line, source=str(file)) from None
        _check_room(client, lane, tenant, [ln.custom_id for ln in lines])
        with _progress(disable=as_json) as progress:
            task = progress.add_task(f"enqueueing into {lane}", total=len(items))
            tickets = client.submit_many(items, on_progress=lambda k: progress.advance(task, k))
        dup = sum(t.duplicate for t in tickets)
        if not wait:
            if as_json:
                _print_json([t.model_dump() for t in tickets])
            else:
                console.print(
                    f"enqueued {len(tickets) - dup} requests into {lane} ({dup} already there)"
                )
            return
        results = []
        with _progress(disable=as_json) as progress:
            task = progress.add_task("waiting for answers", total=len(tickets))
            for t in tickets:
                results.append(client.result(t.id))
                progress.advance(task)
    if as_json:
        _print_json([r.model_dump(mode="json") for r in results])
    else:
        ok = sum(r.ok for r in results)
        console.print(f"{ok}/{len(results)} done; `mixbatch results --out FILE` writes them out")


def _check_room(client: Any, lane: str, tenant: str, custom_ids: list[str]) -> None:
    """Refuse a file that cannot fit whole, so backpressure never leaves half of it enqueued.

    Only lines not already submitted count (resubmitting a file stays idempotent); the store's
    own cap still guards against producers racing for the last places.
    """
    from routing.store.lanes import store_errors

    cap = client.config.lane(lane).max_queued
    if not cap:
        return
    store = client.store
    with store_errors(store.url):
        pipe = store.redis.pipeline(transaction=False)
        for cid in custom_ids:
            pipe.exists(store.keys.idempotency(tenant, cid))
        new = sum(1 for seen in pipe.execute() if not seen)
    if new and store.lane_stats(lane).depth + new > cap:
        raise LaneFull(lane, cap)


@contextmanager
def _progress(disable: bool = False) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=disable,
    ) as progress:
        yield progress


@cli.command()
@click.argument("request_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@example("status")
def status(request_id: str | None, as_json: bool) -> None:
    """One request's state, or with no ID the count of requests per state in every lane."""
    with _client() as client:
        if request_id:
            info = client.status(request_id)
            if as_json:
                _print_json(info.model_dump(mode="json"))
                return
            table = Table(show_header=False)
            for key, value in info.model_dump(mode="json").items():
                if key in ("deadline", "created_at", "updated_at"):
                    value = _when(value)
                table.add_row(key, "-" if value is None else str(value))
            console.print(table)
            return
        stats = [client.store.lane_stats(spec.name) for spec in client.config.by_priority()]
    if as_json:
        _print_json({s.lane: s.counts for s in stats})
        return
    states = sorted({k for s in stats for k in s.counts})
    table = Table(title="requests per state")
    table.add_column("lane")
    for st in states:
        table.add_column(st, justify="right")
    for s in stats:
        table.add_row(s.lane, *[str(s.counts.get(st, 0)) for st in states])
    console.print(table)


@cli.command()
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="default: stdout"
)
@click.option("--lane", "lanes", multiple=True, help="only these lanes (repeatable)")
@click.option("--since", default=None, help="only results finished in this window (e.g. 1h)")
@example("results")
def results(out: Path | None, lanes: tuple[str, ...], since: str | None) -> None:
    """Write finished results in the OpenAI batch output format (id, custom_id, response, error)."""
    from routing.jsonl import write_output
    from routing.models import parse_duration_s

    try:
        start = time.time() - parse_duration_s(since) if since else 0.0
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="--since") from None
    with _client() as client:
        names = list(lanes) or [s.name for s in client.config.by_priority()]
        for name in names:
            client.config.lane(name)
        found = [r for name in names for r in client.store.results(name, since=start)]
    lines = write_output(sorted(found, key=lambda r: r.finished_at or 0))
    if out is None:
        for line in lines:
            sys.stdout.write(line)
        return
    with out.open("w") as fh:
        fh.writelines(lines)
    err_console.print(f"wrote {len(found)} results to {out}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@example("lanes")
def lanes(as_json: bool) -> None:
    """Depth, oldest age and nearest deadline of every lane."""
    with _client() as client:
        specs = client.config.by_priority()
        stats = [client.store.lane_stats(spec.name) for spec in specs]
    if as_json:
        _print_json([s.model_dump() for s in stats])
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
            _age(s.oldest_age_s), _age(s.nearest_deadline_s), str(spec.max_queued),
        )  # fmt: skip
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@example("costs")
def costs(as_json: bool) -> None:
    """Spend by lane, tenant, spend tag and route, priced from the providers' usage with
    config/prices.toml, and what the batch route saved against synchronous prices."""
    from tasks.costs import totals

    with _client() as client:
        data = totals(client.store)
    if as_json:
        _print_json(data)
        return
    if not data:
        console.print("no finished requests priced yet")
        return
    for group, title in (
        ("all", "total"),
        ("route", "by route"),
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


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True)
@click.option("--latency-ms", default=0, show_default=True)
@click.option("--rate-429", default=0.0, show_default=True)
@click.option("--rate-500", default=0.0, show_default=True)
@click.option("--rate-timeout", default=0.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-turnaround-s", default=2.0, show_default=True, help="sandbox s per batch")
@click.option("--time-scale", default=1.0, show_default=True, help="sandbox s per real second")
@example("sandbox")
def sandbox(
    host: str,
    port: int,
    latency_ms: int,
    rate_429: float,
    rate_500: float,
    rate_timeout: float,
    seed: int,
    batch_turnaround_s: float,
    time_scale: float,
) -> None:
    """Serve the SANDBOX provider (OpenAI and Anthropic shapes, fake deterministic answers,
    synchronous endpoints and both batch protocols) on loopback, for running without keys.
    More knobs (line failures, expiry, stuck batches) via POST /sandbox/knobs. Point
    OPENAI_BASE_URL at http://HOST:PORT/v1 and ANTHROPIC_BASE_URL at http://HOST:PORT."""
    from routing.sandbox import Knobs
    from routing.sandbox.server import serve

    knobs = Knobs(
        latency_ms=latency_ms,
        rate_429=rate_429,
        rate_500=rate_500,
        rate_timeout=rate_timeout,
        seed=seed,
        batch_turnaround_s=batch_turnaround_s,
        time_scale=time_scale,
    )
    try:
        serve(host, port, knobs)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the sandbox on {host}:{port} ({exc.strerror}); pick another --port"
        ) from None


def _register() -> None:
    from tasks.cli.dlq import dlq

    cli.add_command(dlq)
    from tasks.cli.ops import register_ops

    register_ops(cli)
    from tasks.cli.explain import explain

    cli.add_command(explain)


_register()


def main() -> None:
    cli(prog_name="mixbatch")


if __name__ == "__main__":
    main()
