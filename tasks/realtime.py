"""``mixbatch.realtime``: call the provider's synchronous endpoint for a chunk of claimed requests,
at the tier of their route (standard, flex or priority)."""

from __future__ import annotations

import time

from config import app
from config.settings import get_settings
from routing.engine.claims import start_claimed
from routing.engine.realtime import Realtime, run_all
from routing.models import Route
from tasks.deliver import dispatch
from tasks.runtime import adapter, observations, prices, retry_policy, store


@app.task(name="mixbatch.realtime", acks_late=True, ignore_result=True)
def realtime(provider: str, items: list[list[str]], route: str = "realtime") -> dict[str, int]:
    """Start each claimed request (refused if its lease was lost), then run them concurrently
    within one budget each, their leases renewed while they run."""
    s, tier = get_settings(), Route(route)
    rt = Realtime(
        store=store(),
        adapter=adapter(provider),
        observations=observations(),
        policy=retry_policy(),
        prices=prices(),
        route=tier,
        fallback_reserve_s=s.realtime_estimate_s,
    )
    started = start_claimed(rt.store, items, route=tier, lease_s=s.lease_s, now=time.time())
    finished = run_all(
        rt,
        started,
        budget_s=s.realtime_budget_s,
        lease_s=s.lease_s,
        concurrency=s.realtime_concurrency,
    )
    dispatch(finished)
    return {"done": len(finished)}
