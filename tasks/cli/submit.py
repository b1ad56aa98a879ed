"""Requests in and answers out: ``mixbatch submit``, ``status`` and ``results``.

    mixbatch submit FILE [--lane L] [--deadline D] [--callback SPEC] [--wait]
                                                               a batch input file, checked whole
    mixbatch status [ID] [--json]                              one request, or counts per lane
    mixbatch results [--out FILE] [--lane L] [--since 1h]      the batch output format

Each takes ``--json``.

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
from routing.jsonl import BatchLine
from tasks.cli.handles import open_client
from tasks.cli.output import console, err_console, example, print_json, progress_bar, when


def file_items(
    file: Path, *, lane: str, deadline: str | None, tenant: str, callback: Any = None
) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """A batch input file, checked whole (a bad line is named), as ``Client.submit`` items."""
    from routing.jsonl import read_batch_file

    with file.open() as fh:
        lines = read_batch_file(fh, source=str(file))
    extra = {} if callback is None else {"callback": callback}
    items = [
        {
            "custom_id": ln.custom_id,
            "endpoint": ln.url,
            "body": ln.body,
            "lane": lane,
            "deadline": deadline,
            "tenant": tenant,
            **extra,
        }
        for ln in lines
    ]
    return lines, items


def parse_callback(spec: str | None) -> dict[str, Any] | None:
    """``sink:NAME`` (a sink the service registered) or ``celery:TASK[@QUEUE]`` (a task of the
    caller's), as the callback ``Client.submit`` takes; the client validates it further."""
    if spec is None:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "sink" and rest:
        return {"sink": rest}
    if kind == "celery" and rest:
        task, _, queue = rest.partition("@")
        if task:
            return {"kind": "celery", "task": task, "queue": queue or None}
    raise InvalidRequest(
        f"{spec!r} is not sink:NAME or celery:TASK[@QUEUE] (e.g. sink:crm, "
        "celery:app.tasks.save_answer@answers)",
        field="--callback",
    )


def _prepare_file(client: Any, file: Path, lines: list[BatchLine], items: list[Any]) -> None:
    """Validate every item; a bad one is named by its file line (or, for the callback every
    line shares, by ``--callback``)."""
    try:
        client.prepare_many(items)
    except InvalidRequest as exc:
        index = int(str(exc.field).removeprefix("items[").removesuffix("]"))
        message = str(exc).split(": ", 1)[1]
        if message.startswith("callback"):
            raise InvalidRequest(message, field="--callback") from None
        raise MalformedInput(message, line=lines[index].line, source=str(file)) from None


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lane", default="standard", show_default=True)
@click.option(
    "--deadline", default=None, help="relative (90s, 15m, 6h, 1d) or ISO time; default: the lane's"
)
@click.option("--tenant", default="default", show_default=True)
@click.option(
    "--callback",
    "callback_spec",
    default=None,
    metavar="SPEC",
    help="where each answer goes: sink:NAME (a sink in the service's sinks table) or "
    "celery:TASK[@QUEUE] (a Celery task of yours)",
)
@click.option("--wait", is_flag=True, help="wait for every answer, with a progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the tickets as JSON")
@example("submit")
def submit(
    file: Path,
    lane: str,
    deadline: str | None,
    tenant: str,
    callback_spec: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Enqueue a file in the OpenAI batch input format (custom_id, method, url, body).

    The whole file is checked first: a bad line is named and nothing is enqueued.
    `mixbatch estimate FILE` prices it first, without enqueueing anything."""
    callback = parse_callback(callback_spec)
    lines, items = file_items(file, lane=lane, deadline=deadline, tenant=tenant, callback=callback)
    with open_client() as client:
        client.config.lane(lane)
        _prepare_file(client, file, lines, items)
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="one JSON document: the lines as an array (with --out: a summary of what was written)",
)
@example("results")
def results(out: Path | None, lanes: tuple[str, ...], since: str | None, as_json: bool) -> None:
    """Write finished results in the OpenAI batch output format (id, custom_id, response, error)."""
    from routing.jsonl import output_line, write_output
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
    found.sort(key=lambda r: r.finished_at or 0)
    if out is None:
        if as_json:
            print_json([output_line(r) for r in found])
            return
        for line in write_output(found):
            sys.stdout.write(line)
        return
    with out.open("w") as fh:
        fh.writelines(write_output(found))
    if as_json:
        print_json({"results": len(found), "out": str(out)})
    else:
        err_console.print(f"wrote {len(found)} results to {out}")
