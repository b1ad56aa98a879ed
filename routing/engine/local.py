"""The local route: answer started requests on our own models and store each answer.

The model runner is a handle (``gpu_worker``'s registry, wired in by the gpu task): this module
maps what it answers onto outcomes. An answer is DONE; a 5xx (out of memory, an internal
failure) goes back to its lane, since the same request may well succeed later; any other error
is FAILED with the runner's code and message. The micro-batch's leases are renewed while the
model runs (``routing.engine.claims.Heartbeat``), so a batch slower than the lease is not run twice.

A request that stops being ours while the model runs (cancelled, or requeued by the sweeper) is
seen at the next lease renewal, and ``cancel`` (the runner's, ``gpu_worker``'s
``Registry.cancel``) drops it before it reaches the device if it is still waiting there; its
answer, if any, would be refused by the store anyway. The runner drops a request past its
``drop_after`` the same way (``expire_after``: the lane's deadline when its policy is
``expire``); both come back as non-retryable errors, 409 and 408.

Answers are priced from the batch's measured busy time (``routing.engine.pricing.price_gpu``)
and added to the cost ledger under route ``gpu`` by the call whose finish won, as on the
other routes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from routing.decide.options import LOCAL_PROVIDER
from routing.engine.claims import Heartbeat
from routing.engine.pricing import GpuPricer
from routing.faults import fault_point
from routing.models import Claimed, ErrorInfo, LaneSpec, Prepared, Route, StoredResult
from routing.states import State
from routing.store.lanes import LaneStore
from routing.store.ledger import Cost, record_many
from routing.store.observations import ObservationStore

R_co = TypeVar("R_co", covariant=True)


class LocalAnswer(Protocol):
    """One request's outcome from the model runner (``gpu_worker.engine.LocalAnswer``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def body(self) -> dict[str, Any] | None: ...

    @property
    def error(self) -> Mapping[str, object] | None: ...

    @property
    def truncated(self) -> bool: ...

    @property
    def ok(self) -> bool: ...

    @property
    def retryable(self) -> bool: ...


#: Answers the started requests, one answer per request, in order.
Runner = Callable[[Sequence[Claimed]], Sequence[LocalAnswer]]


#: A micro-batch takes milliseconds to seconds; one still running after this long is stuck, and
#: its leases are left to run out so that another worker takes the requests over.
MAX_BATCH_S = 600.0


#: Drops requests from the runner before they reach the device (``Registry.cancel``).
Canceller = Callable[[Sequence[str]], object]


class _Watch(Heartbeat):
    """The heartbeat, telling the runner which requests it lost at each renewal."""

    def __init__(self, *args: Any, cancel: Canceller | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cancel = cancel

    def beat(self) -> int:
        before = {rid for rid, _ in self._held}
        kept = super().beat()
        lost = before - {rid for rid, _ in self._held}
        if lost and self.cancel is not None:
            self.cancel(sorted(lost))
        return kept


def expire_after(deadline: float, on_deadline: str) -> float:
    """When the runner may drop a request: its deadline where its lane expires late requests
    (``on_deadline = "expire"``); never where the lane runs them anyway (``run``)."""
    return deadline if on_deadline == "expire" else math.inf


class RequestMaker(Protocol[R_co]):
    """Builds one request for the runner (``gpu_worker.engine.LocalRequest``)."""

    def __call__(
        self,
        id: str,
        endpoint: str,
        body: Mapping[str, Any],
        lane: str,
        deadline: float,
        *,
        drop_after: float,
    ) -> R_co: ...


def local_requests(
    started: Sequence[Claimed], lanes: Sequence[LaneSpec], make: RequestMaker[R_co]
) -> list[R_co]:
    """The runner's requests for ``started``, each with its drop time from its lane's deadline
    policy (``expire_after``), so one nobody wants any more never reaches the device."""
    policy = {spec.name: spec.on_deadline for spec in lanes}
    return [
        make(
            c.id,
            c.request.endpoint.value,
            c.request.body,
            c.request.lane,
            c.request.deadline,
            drop_after=expire_after(c.request.deadline, policy.get(c.request.lane, "run")),
        )
        for c in started
    ]


@dataclass(frozen=True)
class LocalOutcome:
    finished: list[str]
    requeued: int


def run_local(
    store: LaneStore,
    started: Sequence[Claimed],
    run: Runner,
    now: Callable[[], float],
    *,
    lease_s: float,
    max_hold_s: float | None = MAX_BATCH_S,
    price: GpuPricer | None = None,
    busy_clock: Callable[[], float] = time.monotonic,
    cancel: Canceller | None = None,
) -> LocalOutcome:
    """Run ``started`` through the model, leases renewed meanwhile (for at most ``max_hold_s``),
    then store every outcome in one round trip; ``price`` prices the answers by busy time;
    ``cancel`` hears of each request lost meanwhile, to drop it before the device."""
    if not started:
        return LocalOutcome([], 0)
    watch = _Watch(store, started, lease_s=lease_s, now=now, max_hold_s=max_hold_s, cancel=cancel)
    with watch:
        began = busy_clock()
        answers = run(started)
        busy_s = busy_clock() - began
    fault_point("local")  # answered, not yet stored: the batch runs again elsewhere
    at = now()
    finishes: list[tuple[str, str, State, StoredResult]] = []
    done = [(c.request, _result(a)) for c, a in zip(started, answers, strict=True) if a.ok]
    costs: Sequence[Cost | None] = (
        price([(r, res.usage) for r, res in done], busy_s) if price else [None] * len(done)
    )
    priced = iter(zip(done, costs, strict=True))
    ledger: list[tuple[Prepared, Route, Cost] | None] = []
    requeued = 0
    for claimed, answer in zip(started, answers, strict=True):
        if answer.ok:
            (request, result), cost = next(priced)
            if cost is not None:
                result = result.model_copy(update=cost.model_dump())
            finishes.append((claimed.id, claimed.token, State.DONE, result))
            ledger.append(None if cost is None else (request, Route.GPU, cost))
            continue
        error = answer.error or {"code": "error", "message": "no answer"}
        info = ErrorInfo(
            code=str(error["code"]),
            message=str(error["message"]),
            retryable=answer.retryable,
            status_code=answer.status_code,
        )
        if answer.retryable:
            store.requeue(claimed.id, claimed.token, info, now=at)
            requeued += 1
            continue
        failed = StoredResult(status_code=answer.status_code, error=info, provider=LOCAL_PROVIDER)
        finishes.append((claimed.id, claimed.token, State.FAILED, failed))
        ledger.append(None)
    won = store.finish_many(finishes, now=at)
    record_many(store, [e for e, ok in zip(ledger, won, strict=True) if ok and e], at=at)
    return LocalOutcome([rid for (rid, *_), ok in zip(finishes, won, strict=True) if ok], requeued)


def _result(answer: LocalAnswer) -> StoredResult:
    body = answer.body or {}
    usage = body.get("usage")
    return StoredResult(
        status_code=answer.status_code,
        body=body,
        usage=usage if isinstance(usage, dict) else None,
        provider=LOCAL_PROVIDER,
        truncated=answer.truncated,
    )


class _Spec(Protocol):
    @property
    def name(self) -> str: ...


class Models(Protocol):
    """The served models of a gpu worker (``gpu_worker.registry.Registry``)."""

    def served(self) -> list[str]: ...

    def spec(self, name: object) -> _Spec: ...

    def engine(self, name: object) -> object: ...

    def stats(self) -> dict[str, dict[str, Any]]: ...


def warm(models: Models) -> list[str]:
    """Load every configured model now, so the first micro-batch does not pay for it."""
    names = sorted({models.spec(name).name for name in models.served()})
    for name in names:
        models.engine(name)
    return names


def report(observations: ObservationStore, models: Models) -> None:
    """Each loaded model's measured throughput and queue wait, for the route choice; the
    report is also the liveness signal. Aliases go with it, so an alias routes locally too."""
    served = {name: models.spec(name).name for name in models.served()}
    for model, values in models.stats().items():
        observations.record_gpu(
            model,
            texts_per_s=values.get("texts_per_s"),
            queue_wait_s=values.get("queue_wait_s"),
            aliases=[name for name, of in served.items() if of == model and name != model],
        )
