"""What every command prints with: the two consoles, JSON, times and ages, progress bars, and the
example each command's help ends with (one table, so the help and its tests read the same one)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

EXAMPLES = {
    "up": "mixbatch up                      # from any directory: embedded Redis + every process",
    "demo": "mixbatch demo --requests 300",
    "submit": "mixbatch submit batch.jsonl --lane bulk --deadline 6h --wait",
    "estimate": "mixbatch estimate batch.jsonl --lane bulk --deadline 6h   |   ... --json",
    "cancel": "mixbatch cancel --file batch.jsonl   |   mixbatch cancel --lane bulk --yes",
    "status": "mixbatch status urgent.01JD3...   |   mixbatch status --json",
    "results": "mixbatch results --out answers.jsonl",
    "lanes": "mixbatch lanes --json",
    "sandbox": "mixbatch sandbox --port 8900 --latency-ms 50 --rate-429 0.05",
    "costs": "mixbatch costs --json   |   mixbatch costs --plot out.png --hours 24",
    "explain": "mixbatch explain standard.01JD3...   |   mixbatch explain standard.01JD3... --json",
    "top": "mixbatch top                     # Ctrl-C to leave; --once or --json for scripts",
    "health": "mixbatch health --json          # exit 0 healthy, 3 Redis down, 1 otherwise",
    "metrics": "mixbatch metrics --port 9808    # then curl http://127.0.0.1:9808/metrics",
    "flower": "mixbatch flower --port 5555     # public address: set MIXBATCH_FLOWER_BASIC_AUTH",
}


def example(name: str) -> Callable[[F], F]:
    """Append the command's example to its help. The docstring is dedented first: click would
    otherwise re-wrap its indented continuation lines with the indentation inside the paragraph."""

    def wrap(fn: F) -> F:
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n\b\nExample:\n  {EXAMPLES[name]}"
        return fn

    return wrap


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 120:
        return f"{sign}{s:.0f}s"
    if s < 7200:
        return f"{sign}{s / 60:.0f}m"
    return f"{sign}{s / 3600:.1f}h"


def progress_bar(on: Console = err_console, *, disable: bool = False) -> Progress:
    """A progress bar (a context manager), on stderr unless told: stdout stays clean for
    ``--json``."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=on,
        disable=disable,
    )
