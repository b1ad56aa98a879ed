"""The leased routes' (realtime, local) first step and their heartbeat.

``start_claimed``: a message carries ids and lease tokens only; the requests are re-read from
the store, and one whose lease was lost meanwhile (the sweeper requeued it, another worker holds
it) is left out, so a late or repeated message never runs a request twice.

``Heartbeat``: while a worker runs what it started, a thread renews those leases, so a call or a
micro-batch slower than the lease is not requeued under the worker (and run, and paid for, twice)
and its attempt is not used up. Only a dead worker stops renewing, so only its leases run out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from routing.models import Claimed, Route
from routing.states import State
from routing.store.lanes import LaneStore

log = logging.getLogger(__name__)

#: Renewals per lease: a lease survives two missed beats (a slow Redis reply, a GC pause).
BEATS_PER_LEASE = 3


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


class Heartbeat:
    """Renew the leases of ``held`` every ``lease_s / 3`` while the ``with`` block runs.

    A request that is no longer ours (finished, cancelled, requeued) drops out at the next beat.
    ``max_hold_s`` bounds the renewing: a worker still inside its block that long is stuck (the
    work has a budget of its own), and its leases are left to run out like a dead worker's.
    Renewal errors (Redis away a moment) are logged and retried at the next beat; the thread
    never raises, and it is joined when the block ends.
    """

    def __init__(
        self,
        store: LaneStore,
        held: Sequence[Claimed],
        *,
        lease_s: float,
        now: Callable[[], float] = time.time,
        max_hold_s: float | None = None,
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.period_s = lease_s / BEATS_PER_LEASE
        self.max_hold_s = max_hold_s
        self._now = now
        self._held = [(c.id, c.token) for c in held]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._held:
            self._thread = threading.Thread(
                target=self._run, name="mixbatch-lease-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self) -> int:
        """Renew every lease still ours once; how many are."""
        kept = self.store.renew_many(self._held, lease_s=self.lease_s, now=self._now())
        self._held = [pair for pair, ok in zip(self._held, kept, strict=True) if ok]
        return len(self._held)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.period_s) and self._held:
            if self.max_hold_s is not None and time.monotonic() - started > self.max_hold_s:
                log.warning(
                    "lease heartbeat stopped: the work ran past its limit",
                    extra={"held": len(self._held), "max_hold_s": self.max_hold_s},
                )
                return
            try:
                self.beat()
            except Exception:
                log.warning("lease heartbeat failed, retrying next beat", exc_info=True)
