"""``mixbatch dlq``: the deliveries that were given up on, with the last error of each.

    mixbatch dlq list [--json]
    mixbatch dlq replay ID | --all [--json]   back into the lane's outbox; the sweeper re-sends it
    mixbatch dlq drop ID [--json]             forget the dead letter (the result stays until its TTL)

A dead letter's result is still stored, so a replay after fixing the cause (a receiver that was
down, a missing secret, an allow-list entry) delivers it, and the sink still applies it once.
Errors go through the ``mixbatch`` group, which prints one line and sets the exit code.
"""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from routing.errors import NotFound
from routing.store.lanes import LaneStore
from tasks.cli.handles import open_client
from tasks.cli.output import console, err_console, print_json, when

__all__ = ["NoDeadLetter", "dlq", "drop_dead_letter", "replay_dead_letter"]


class NoDeadLetter(NotFound):
    def __str__(self) -> str:
        return f"no dead letter with id {self.request_id!r} (see `mixbatch dlq list`)"


def replay_dead_letter(st: LaneStore, request_id: str, *, now: float | None = None) -> bool:
    """Put a dead letter back in its lane's outbox, with a fresh count of delivery attempts.

    False when the request itself is gone (its result outlived ``MIXBATCH_RESULT_TTL_S``); the
    entry is then left for ``drop``.
    """
    replayed = st.dlq.replay(request_id, now=now)
    if replayed is None:
        raise NoDeadLetter(request_id)
    return replayed


def drop_dead_letter(st: LaneStore, request_id: str) -> None:
    """Forget a dead letter for good; the stored result is kept until its TTL runs out."""
    if not st.dlq.drop(request_id):
        raise NoDeadLetter(request_id)


def _last_error(entry: dict[str, Any]) -> str:
    err = entry.get("error") or {}
    code, message = err.get("code", "?"), err.get("message", "")
    return f"{code}: {message}" if message else str(code)


@click.group()
def dlq() -> None:
    """Deliveries given up on (dead letters): list, replay or drop them."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON")
def list_(as_json: bool) -> None:
    """Every dead letter, oldest first: id, lane, when, and the last error."""
    with open_client() as client:
        entries = client.store.dlq.entries()
    if as_json:
        print_json(entries)
        return
    if not entries:
        console.print("no dead letters")
        return
    table = Table(title=f"dead letters ({len(entries)})")
    table.add_column("id", no_wrap=True)
    table.add_column("lane", no_wrap=True)
    table.add_column("when", no_wrap=True)
    table.add_column("last error", overflow="fold")
    for e in entries:
        table.add_row(e["id"], e["lane"], when(e["at"]), escape(_last_error(e)))
    console.print(table)


@dlq.command()
@click.argument("request_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter")
@click.option("--json", "as_json", is_flag=True, help="print what was replayed as JSON")
def replay(request_id: str | None, replay_all: bool, as_json: bool) -> None:
    """Send a dead letter (or --all of them) again: back into its lane's outbox, with a fresh
    count of delivery attempts. The sweeper re-sends it within seconds."""
    if bool(request_id) == replay_all:
        raise click.UsageError("give one ID, or --all")
    with open_client() as client:
        st = client.store
        ids = [e["id"] for e in st.dlq.entries()] if replay_all else [str(request_id)]
        gone = [rid for rid in ids if not replay_dead_letter(st, rid)]
    if as_json:
        print_json({"replayed": [r for r in ids if r not in gone], "expired": gone})
        if gone:
            raise SystemExit(1)
        return
    for rid in gone:
        err_console.print(
            f"{rid}: its result has expired, nothing to send; `mixbatch dlq drop {rid}` forgets it",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"replayed {len(ids) - len(gone)} of {len(ids)}", highlight=False)
    if gone:
        raise SystemExit(1)


@dlq.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="print what was dropped as JSON")
def drop(request_id: str, as_json: bool) -> None:
    """Forget a dead letter without delivering it."""
    with open_client() as client:
        drop_dead_letter(client.store, request_id)
    if as_json:
        print_json({"dropped": request_id})
        return
    console.print(f"dropped {request_id}", highlight=False)
