"""``mixbatch.realtime``: call the provider's synchronous endpoint for a chunk of claimed requests."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from config import app
from config.settings import get_settings
from routing.decide.backoff import backoff_s
from routing.errors import MixbatchError, NotFound, ProviderError
from routing.models import Claimed, ErrorInfo, Route, StoredResult
from routing.providers import call_with_retries
from routing.states import State
from routing.store.semaphore import RedisSemaphore
from tasks.costs import price
from tasks.costs import record as record_cost
from tasks.deliver import dispatch
from tasks.explain import observations
from tasks.runtime import adapter, retry_policy, store

log = logging.getLogger(__name__)


def _error_info(exc: MixbatchError) -> ErrorInfo:
    code = "rate_limited" if getattr(exc, "status_code", None) == 429 else type(exc).__name__
    return ErrorInfo(
        code=code,
        message=str(exc),
        retryable=exc.retryable,
        status_code=getattr(exc, "status_code", None),
    )


def run_one(provider: str, claimed: Claimed, budget_s: float) -> State | None:
    """One request, start to outcome. Returns the state it ended in (None: lease lost)."""
    st, req = store(), claimed.request
    acct = adapter(provider).account
    sem = RedisSemaphore(
        st.redis,
        st.keys.semaphore(provider, req.model),
        acct.max_concurrency,
        lease_s=budget_s + 30,
    )
    started = time.monotonic()  # learned route choice: latency as a caller sees it
    try:
        with sem.hold(timeout_s=budget_s):
            resp = call_with_retries(
                adapter(provider), req.endpoint, req.body, policy=retry_policy(), budget_s=budget_s
            )
    except MixbatchError as exc:
        info = _error_info(exc)
        if info.code == "rate_limited":  # learned route choice: no headroom until retry-after
            observations().record_realtime(
                provider,
                req.model,
                latency_s=None,
                at=time.time(),
                rate_limit={"retry-after": str(getattr(exc, "retry_after_s", None) or 0)},
                limited=True,
            )
        if exc.retryable:
            wait = getattr(exc, "retry_after_s", None) or backoff_s(
                claimed.attempts, retry_policy()
            )
            log.info(
                "realtime retry later",
                extra={"request_id": claimed.id, "provider": provider, "error": info.code},
            )
            return st.requeue(claimed.id, claimed.token, info, ready_at=time.time() + wait)
        body = exc.body if isinstance(exc, ProviderError) and isinstance(exc.body, dict) else None
        ok = st.finish(
            claimed.id,
            claimed.token,
            State.FAILED,
            StoredResult(status_code=info.status_code, body=body, error=info, provider=provider),
        )
        return State.FAILED if ok else None
    observations().record_realtime(  # learned route choice: latency and rate-limit headroom
        provider,
        req.model,
        latency_s=time.monotonic() - started,
        at=time.time(),
        rate_limit=resp.rate_limit,
    )
    usage = resp.body.get("usage")
    cost = price(req, provider, Route.REALTIME, usage if isinstance(usage, dict) else None)
    ok = st.finish(
        claimed.id,
        claimed.token,
        State.DONE,
        StoredResult(
            status_code=resp.status_code,
            body=resp.body,
            usage=usage if isinstance(usage, dict) else None,
            provider=provider,
            provider_request_id=resp.provider_request_id,
            latency_s=resp.latency_s,
            **cost.model_dump(),
        ),
    )
    if ok:
        record_cost(st, req, Route.REALTIME, cost)
    return State.DONE if ok else None


@app.task(name="mixbatch.realtime", acks_late=True, ignore_result=True)
def realtime(provider: str, items: list[list[str]]) -> dict[str, int]:
    """Start each claimed request (refused if its lease was lost), then run them concurrently."""
    s, st = get_settings(), store()
    budget_s = max(s.lease_s * 0.75, 1.0)
    started: list[Claimed] = []
    for request_id, token in items:
        try:
            req = st.prepared(request_id)
        except NotFound:
            continue
        claimed = Claimed(
            id=request_id, token=token, attempts=st.status(request_id).attempts, request=req
        )
        if st.start(claimed, state=State.RUNNING, route=Route.REALTIME, lease_s=s.lease_s):
            started.append(claimed)
    if not started:
        return {"done": 0}
    with ThreadPoolExecutor(max_workers=min(len(started), s.realtime_concurrency)) as pool:
        outcomes = list(pool.map(lambda c: run_one(provider, c, budget_s), started))
    finished = [
        c.id for c, o in zip(started, outcomes, strict=True) if o in (State.DONE, State.FAILED)
    ]
    dispatch(finished)
    return {"done": len(finished)}
