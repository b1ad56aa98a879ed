"""Delivery leases held through a batch: renewed, fenced, before each attempt.

``LaneStore.claim_deliveries`` takes a batch's deliveries under one lease; a worker whose batch
runs long (a slow sink early in it) renews what it still holds here, so each delivery is
attempted inside a live lease and the sweeper never re-sends one that a worker is about to send.
"""

from __future__ import annotations

from collections.abc import Mapping

from routing.store.base import StoreBase, store_errors

__all__ = ["renew_deliveries"]


def renew_deliveries(
    st: StoreBase, held: Mapping[str, int], *, lease_until: float, new_lease_until: float
) -> set[str]:
    """Push the leases of ``held`` (id -> the attempt number its claim returned, all claimed
    until ``lease_until``) to ``new_lease_until``, one round trip; the ids still ours."""
    if not held:
        return set()
    with store_errors(st.url):
        pipe = st.redis.pipeline(transaction=False)
        for rid, attempt in held.items():
            k = st.request_keys(rid)
            st.scripts["deliver_renew"](
                keys=[k["req"], k["outbox"]],
                args=[rid, attempt, repr(lease_until), repr(new_lease_until)],
                client=pipe,
            )
        out = pipe.execute()
    return {rid for rid, ok in zip(held, out, strict=True) if ok}
