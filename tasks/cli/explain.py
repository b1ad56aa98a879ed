"""``mixbatch explain ID``: why a request got its route.

    mixbatch explain urgent.01JD3...          candidates, their estimates, costs and the reason
    mixbatch explain urgent.01JD3... --json

The aggregator keeps each request's latest ``Decision`` in the request's hash when it routes it
(``tasks.explain.record_decisions``); this reads it back. An unknown or expired id is one red
line and a non-zero exit, through the ``mixbatch`` group, like every other command.
"""

from __future__ import annotations

import math

import click
from rich.markup import escape
from rich.table import Table

from routing.store.observations import DecisionStore, Explained
from tasks.cli.handles import open_client
from tasks.cli.output import console, example, print_json, when

__all__ = ["explain"]


def _seconds(value: float) -> str:
    if math.isinf(value):
        return "never"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.2f}h"


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.8f}".rstrip("0").rstrip(".")


def _print(found: Explained) -> None:
    console.print(
        f"[bold]{escape(found.id)}[/]  lane {found.lane}, state {found.state}, "
        f"route {found.route or '-'}, deadline {when(found.deadline)}"
    )
    decision = found.decision
    if decision is None:
        console.print("not routed yet: the aggregator has not claimed it (or it predates explain)")
        return
    quantile = f"p{(decision.quantile or 0) * 100:g}" if decision.quantile else "expected"
    table = Table(title=f"candidates at {when(decision.decided_at)}")
    table.add_column("route", no_wrap=True)
    table.add_column("provider", no_wrap=True)
    table.add_column(f"{quantile} finish", justify="right", no_wrap=True)
    table.add_column("margin", justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("fits", no_wrap=True)
    notes: list[str] = []
    for c in decision.candidates:
        chosen = c.route is decision.route and c.provider == decision.provider
        name = f"{c.route.value}/{c.provider}"
        table.add_row(
            ("[bold green]> [/]" if chosen else "  ") + c.route.value,
            c.provider,
            _seconds(c.expected_finish_s),
            _seconds(c.margin_s),
            _usd(c.expected_cost_usd),
            "yes" if c.fits else "no",
        )
        notes.append(f"  {escape(name)}: {escape(c.why)}; estimate: {escape(c.estimate)}")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"reason: {escape(decision.reason)}")
    for warning in decision.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if found.decisions > 1:
        console.print(f"routed {found.decisions} times (retries or hedges); the latest is shown")


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="the decision as JSON")
@example("explain")
def explain(request_id: str, as_json: bool) -> None:
    """Why a request got its route: every candidate route with its expected finish (at the
    configured quantile), its expected cost, whether it fits the deadline, and the reason."""
    with open_client() as client:
        st = client.store
        found = DecisionStore(st.redis, st.keys, url=st.url).explain(request_id)
    if as_json:
        print_json(found.model_dump(mode="json"))
        return
    _print(found)
