"""The first step of every leased route (realtime, local): start what a message hands over.

A message carries ids and lease tokens only; the requests are re-read from the store, and one
whose lease was lost meanwhile (the sweeper requeued it, another worker holds it) is left out,
so a late or repeated message never runs a request twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from routing.models import Claimed, Route
from routing.states import State
from routing.store.lanes import LaneStore


def start_claimed(
    store: LaneStore,
    items: Sequence[Sequence[str]],
    *,
    route: Route,
    lease_s: float,
    now: float,
) -> list[Claimed]:
    """``[id, token]`` pairs to RUNNING on ``route``, lease renewed; the ones that started.

    ``attempts`` is left at 0: only a retry needs the count, and it reads it then.
    """
    holders = store.holders([rid for rid, _ in items])
    candidates = [
        Claimed(id=rid, token=token, attempts=0, request=holders[rid][0])
        for rid, token in items
        if rid in holders and holders[rid][2] == token
    ]
    started = store.start_many(
        candidates, state=State.RUNNING, route=route, lease_s=lease_s, now=now
    )
    return [c for c, ok in zip(candidates, started, strict=True) if ok]
