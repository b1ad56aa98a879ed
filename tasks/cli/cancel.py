"""``mixbatch cancel``: cancel requests by id, by the custom_ids of a file, or a whole lane's queue.

    mixbatch cancel ID...                    these requests
    mixbatch cancel --file FILE [--tenant T] the requests a batch input file submitted
    mixbatch cancel --lane L                 everything still queued in lane L

Each cancel is ``Client.cancel``: a request still waiting anywhere (queued, claimed, running, in
a provider batch) ends CANCELLED and its delivery is queued; one already finished keeps its
outcome. Every target is looked up first: an id or custom_id that does not exist is listed and
nothing at all is cancelled. Then a confirmation (on stderr), which ``--yes`` skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from routing.errors import NotFound
from routing.states import FINISHED, State
from routing.store.base import decode, store_errors
from routing.store.lanes import LaneStore
from tasks.cli.handles import open_client
from tasks.cli.output import console, example, print_json

__all__ = ["Missing", "cancel"]


class Missing(NotFound):
    """Some targets do not exist; nothing was cancelled."""

    def __init__(self, what: str, names: Sequence[str], where: str) -> None:
        super().__init__(names[0])
        self.names = list(names)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        shown = ", ".join(repr(n) for n in self.names[:20])
        more = f" and {len(self.names) - 20} more" if len(self.names) > 20 else ""
        return (
            f"{len(self.names)} {self.what} {self.where} do not exist (never submitted, or "
            f"expired): {shown}{more}; nothing was cancelled"
        )


def outcomes_now(st: LaneStore, ids: Sequence[str]) -> list[State | None]:
    """Each request's outcome when it has finished, else its state; None: no such request."""
    with store_errors(st.url):
        pipe = st.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(st.keys.request(rid), "state", "outcome")
        rows = pipe.execute()
    return [State(decode(out or state)) if state else None for state, out in rows]


def _by_id(st: LaneStore, ids: Sequence[str]) -> dict[str, str | None]:
    missing = [rid for rid, now in zip(ids, outcomes_now(st, ids), strict=True) if now is None]
    if missing:
        raise Missing("ids", missing, "given")
    return dict.fromkeys(ids)


def _by_custom_id(st: LaneStore, file: Path, tenant: str) -> dict[str, str | None]:
    """Request id -> custom_id of every line of ``file`` (the tenant's idempotency keys)."""
    from routing.jsonl import read_batch_file

    with file.open() as fh:
        custom_ids = [ln.custom_id for ln in read_batch_file(fh, source=str(file))]
    with store_errors(st.url):
        pipe = st.redis.pipeline(transaction=False)
        for cid in custom_ids:
            pipe.get(st.keys.idempotency(tenant, cid))
        found = [None if raw is None else decode(raw).partition("|")[0] for raw in pipe.execute()]
    known = [rid for rid in found if rid]
    alive = dict(zip(known, outcomes_now(st, known), strict=True))
    missing = [cid for cid, rid in zip(custom_ids, found, strict=True) if not alive.get(rid or "")]
    if missing:
        raise Missing("custom_ids", missing, f"of {file} (tenant {tenant!r})")
    return {rid: cid for cid, rid in zip(custom_ids, found, strict=True) if rid}


def _queued(st: LaneStore, lane: str) -> dict[str, str | None]:
    """Every request waiting in the lane's queue or its delayed set (a retry's backoff)."""
    return dict.fromkeys(st.queued_ids(lane))


@click.command()
@click.argument("ids", nargs=-1)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="cancel what this batch input file submitted, by custom_id",
)
@click.option("--tenant", default="default", show_default=True, help="with --file: whose ids")
@click.option("--lane", default=None, help="cancel everything still queued in this lane")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="print each request's outcome as JSON")
@example("cancel")
def cancel(
    ids: tuple[str, ...],
    file: Path | None,
    tenant: str,
    lane: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Cancel requests: by ID, by the custom_ids of a batch input file (--file), or everything
    queued in a lane (--lane). A request not finished yet ends CANCELLED (its delivery still
    happens); a finished one keeps its outcome. An id or custom_id that does not exist is
    listed, and then nothing is cancelled. Asks first, unless --yes."""
    if sum((bool(ids), file is not None, lane is not None)) != 1:
        raise click.UsageError("give request IDs, or --file FILE, or --lane LANE (one of them)")
    with open_client() as client:
        st = client.store
        if file is not None:
            targets = _by_custom_id(st, file, tenant)
            where = f"submitted by {file}"
        elif lane is not None:
            client.config.lane(lane)
            targets = _queued(st, lane)
            where = f"queued in lane {lane}"
        else:
            targets = _by_id(st, ids)
            where = "given"
        if targets and not yes:
            click.confirm(f"cancel {len(targets)} requests {where}?", abort=True, err=True)
        outcomes: list[dict[str, Any]] = []
        before = outcomes_now(st, list(targets))
        for (rid, custom_id), was in zip(targets.items(), before, strict=True):
            state = was
            if was is not None and was not in FINISHED:
                try:
                    state = client.cancel(rid)
                except NotFound:
                    state = None  # its result expired between the look-up and now
            cancelled = state is State.CANCELLED and was is not State.CANCELLED
            outcomes.append(
                {"id": rid, "custom_id": custom_id, "state": state, "cancelled": cancelled}
            )
    done = sum(o["cancelled"] for o in outcomes)
    if as_json:
        print_json(
            {
                "requested": len(outcomes),
                "cancelled": done,
                "requests": [{**o, "state": o["state"] and o["state"].value} for o in outcomes],
            }
        )
        return
    kept: dict[str, int] = {}
    for o in outcomes:
        if not o["cancelled"]:
            name = o["state"].value if o["state"] else "gone"
            kept[name] = kept.get(name, 0) + 1
    rest = "".join(f", {n} already {state}" for state, n in sorted(kept.items()))
    console.print(f"cancelled {done} of {len(outcomes)} requests {where}{rest}", highlight=False)
