"""Requests in and answers out: ``mixbatch submit``, ``status`` and ``results``.

    mixbatch submit FILE [--lane L] [--deadline D] [--wait]   a batch input file, checked whole
    mixbatch status [ID] [--json]                              one request, or counts per lane
    mixbatch results [--out FILE] [--lane L] [--since 1h]      the batch output format

They talk to Redis through ``routing.client``, as any producer does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from routing.errors import InvalidRequest, LaneFull, MalformedInput
from tasks.cli.handles import open_client
from tasks.cli.output import console, err_console, example, print_json, progress_bar, when


@click.command()
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
    with open_client() as client:
        client.config.lane(lane)
        try:
            client.prepare_many(items)
        except InvalidRequest as exc:
            index = int(str(exc.field).removeprefix("items[").removesuffix("]"))
            message = str(exc).split(": ", 1)[1]
            raise MalformedInput(message, line=lines[index].line, source=str(file)) from None
        _check_room(client, lane, tenant, [ln.custom_id for ln in lines])
        with progress_bar(disable=as_json) as progress:
            task = progress.add_task(f"enqueueing into {lane}", total=len(items))
            tickets = client.submit_many(items, on_progress=lambda k: progress.advance(task, k))
        dup = sum(t.duplicate for t in tickets)
        if not wait:
            if as_json:
                print_json([t.model_dump() for t in tickets])
            else:
                console.print(
                    f"enqueued {len(tickets) - dup} requests into {lane} ({dup} already there)"
                )
            return
        results = []
        with progress_bar(disable=as_json) as progress:
            task = progress.add_task("waiting for answers", total=len(tickets))
            for t in tickets:
                results.append(client.result(t.id))
                progress.advance(task)
    if as_json:
        print_json([r.model_dump(mode="json") for r in results])
    else:
        ok = sum(r.ok for r in results)
        console.print(f"{ok}/{len(results)} done; `mixbatch results --out FILE` writes them out")


def _check_room(client: Any, lane: str, tenant: str, custom_ids: list[str]) -> None:
    """Refuse a file that cannot fit whole, so backpressure never leaves half of it enqueued.

    Only lines not already submitted count (resubmitting a file stays idempotent); the store's
    own cap still guards against producers racing for the last places.
    """
    from routing.store.base import store_errors

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


@click.command()
@click.argument("request_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@example("status")
def status(request_id: str | None, as_json: bool) -> None:
    """One request's state, or with no ID the count of requests per state in every lane."""
    with open_client() as client:
        if request_id:
            info = client.status(request_id)
            if as_json:
                print_json(info.model_dump(mode="json"))
                return
            table = Table(show_header=False)
            for key, value in info.model_dump(mode="json").items():
                if key in ("deadline", "created_at", "updated_at"):
                    value = when(value)
                table.add_row(key, "-" if value is None else str(value))
            console.print(table)
            return
        stats = [client.store.lane_stats(spec.name) for spec in client.config.by_priority()]
    if as_json:
        print_json({s.lane: s.counts for s in stats})
        return
    states = sorted({k for s in stats for k in s.counts})
    table = Table(title="requests per state")
    table.add_column("lane")
    for st in states:
        table.add_column(st, justify="right")
    for s in stats:
        table.add_row(s.lane, *[str(s.counts.get(st, 0)) for st in states])
    console.print(table)


@click.command()
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
    with open_client() as client:
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
