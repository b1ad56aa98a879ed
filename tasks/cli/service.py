"""The service's processes: ``mixbatch up``, ``demo``, ``sandbox``, ``metrics`` and ``flower``.

    mixbatch up [NAME...] [--procfile P]        embedded Redis if needed, then every process
    mixbatch demo [--requests N]                the main job end to end, offline
    mixbatch sandbox [--port N] [--latency-ms]  the SANDBOX provider on loopback
    mixbatch metrics [--port N] [--once]        the Prometheus endpoint (``tasks.cli.metrics``)
    mixbatch flower [--address A] [--port N]    Flower, refusing a public bind without auth

Each runs in the foreground until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from config.ops import load_ops_settings
from routing.errors import ConfigError
from routing.store.base import redact_url
from tasks.cli.handles import load_settings, open_observer
from tasks.cli.output import console, err_console, example, print_json


@click.command()
@click.argument("names", nargs=-1)
@click.option(
    "--procfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="default: ./Procfile if there is one, else the default process set",
)
@click.option("--dry-run", is_flag=True, help="print the processes that would run, then exit")
@click.option("--json", "as_json", is_flag=True, help="with --dry-run: the processes as JSON")
@example("up")
def up(names: tuple[str, ...], procfile: Path | None, dry_run: bool, as_json: bool) -> None:
    """Run the whole service in the foreground, from any directory: the embedded Redis unless
    MIXBATCH_REDIS_URL is set, then every process (through honcho), or only the NAMES given.
    Ctrl-C or SIGTERM stops all of them.

    The processes are ./Procfile when there is one, else the default set shipped with mixbatch
    (worker, beat, flower, metrics, and gpu when the gpu extra is installed). The data
    directory (MIXBATCH_DATA_DIR) is created either way. A long-running process: its output is
    the processes' logs, so --json applies to --dry-run only."""
    from honcho.manager import Manager

    from routing.store.embedded import ensure_running
    from tasks.cli.procfile import load_processes

    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run (a running `up` prints its logs)")
    s = load_settings()
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    chosen = load_processes(procfile, only=names, path=path)
    if dry_run:
        if as_json:
            print_json(chosen.model_dump())
        else:
            click.echo(f"from {chosen.source}:")
            for name, command in chosen.processes.items():
                click.echo(f"  {name}: {command}")
        return
    s.lanes()  # a bad lanes table stops `up` here, before any process starts
    s.data_dir.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule there, any Redis
    owned = None
    url = s.redis_url
    if not url:
        url, owned = ensure_running(s.data_dir, appendfsync=s.embedded_fsync)
        console.print(f"embedded Redis at {url} (data in {s.data_dir}/, AOF on)", highlight=False)
    else:
        console.print(f"Redis at {redact_url(url)}", highlight=False)
    console.print(f"processes from {chosen.source}: {', '.join(chosen.processes)}")
    os.environ["MIXBATCH_REDIS_URL"] = url
    os.environ["PATH"] = path
    from config.settings import reset_settings

    reset_settings()
    try:
        from tasks.runtime import store

        store().publish_config(load_settings().service_config())
        manager = Manager()
        for name, command in chosen.processes.items():
            manager.add_process(name, command, env=dict(os.environ))
        manager.loop()
    finally:
        if owned is not None:
            owned.stop()
    sys.exit(manager.returncode or 0)


@click.command()
@click.option("--requests", "n", default=300, show_default=True, help="size of the sample workload")
@click.option("--timeout", "timeout_s", default=180.0, show_default=True, help="seconds to wait")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@example("demo")
def demo(n: int, timeout_s: float, as_json: bool) -> None:
    """The main job end to end, offline: embedded Redis, the sandbox provider, a worker and
    beat; submits a mixed-lane workload with a progress bar, waits, prints a summary."""
    from tasks.cli.demo import run_demo

    out = err_console if as_json else console
    data_dir = load_settings().data_dir
    sys.exit(run_demo(data_dir, n=n, timeout_s=timeout_s, console=out, as_json=as_json))


@click.command()
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
    OPENAI_BASE_URL at http://HOST:PORT/v1 and ANTHROPIC_BASE_URL at http://HOST:PORT.
    A long-running process: it prints logs, so it has no --json."""
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


@click.command()
@click.option("--port", type=int, default=None, help="default MIXBATCH_METRICS_PORT (9808)")
@click.option("--address", default=None, help="default MIXBATCH_METRICS_ADDRESS (127.0.0.1)")
@click.option("--once", is_flag=True, help="print what a scrape would get and exit")
@example("metrics")
def metrics(port: int | None, address: str | None, once: bool) -> None:
    """Serve the Prometheus endpoint (/metrics): lane depth, age and slack, requests by lane,
    route and outcome, deadline misses, batches in flight, cost and savings. Everything is
    read from Redis on each scrape, so counters survive restarts of any process. A
    long-running process: no --json (--once prints the Prometheus text format;
    `mixbatch top --json` has the same numbers as JSON)."""
    from tasks.cli.metrics import build_registry, render_text, serve

    ops = load_ops_settings()
    observer, store = open_observer()
    registry = build_registry(lambda: observer, lambda: load_settings().providers)
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


@click.command()
@click.option("--address", default=None, help="default MIXBATCH_FLOWER_ADDRESS (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default MIXBATCH_FLOWER_PORT (5555)")
@example("flower")
def flower(address: str | None, port: int | None) -> None:
    """Run Flower (the Celery web UI) on the service's broker. A non-loopback address needs
    MIXBATCH_FLOWER_BASIC_AUTH=user:password; the password never appears on a command line.
    A long-running process: it prints logs, so it has no --json."""
    from config.flower import run_flower

    ops = load_ops_settings()
    s = load_settings()
    s.broker_url()  # no Redis to watch is a clear error here, not in Flower
    sys.exit(
        run_flower(ops, address=address, port=port, log_level=s.log_level, log_format=s.log_format)
    )
