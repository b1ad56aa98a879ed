"""``mixbatch.deliver``: hand a finished request's result to its callback, at least once.

The request id travels with the payload as the idempotency key, so a receiver applies it once.
Failures are retried with the shared backoff; after ``delivery_max_attempts`` the request goes
to the dead-letter list with its last error. The outbox in the store, not this message, is what
makes delivery durable: the sweeper re-sends anything overdue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from config import app
from config.settings import get_settings
from routing.backoff import RetryPolicy, backoff_s
from routing.errors import NotFound
from routing.models import CeleryCallback, ErrorInfo, Result
from tasks.common import store

log = logging.getLogger(__name__)

DELIVERY_POLICY = RetryPolicy(max_tries=100, base_s=2.0, cap_s=600.0)


def callback_payload(result: Result) -> dict[str, Any]:
    return result.model_dump(mode="json")


def send_callback(callback: CeleryCallback, result: Result) -> None:
    app.send_task(
        callback.task,
        args=[callback_payload(result)],
        queue=callback.queue,
        headers={"mixbatch_request_id": result.id},
        argsrepr=f"id={result.id} status={result.status.value}",
    )


@app.task(name="mixbatch.deliver", acks_late=True, ignore_result=True)
def deliver(request_id: str) -> str:
    s, st = get_settings(), store()
    attempt = st.claim_delivery(request_id, lease_s=s.delivery_lease_s)
    if attempt is None:
        return "not due"
    try:
        prepared = st.prepared(request_id)
        result = st.result(request_id)
    except NotFound:
        return "gone"
    if result is None:
        return "not finished"
    if prepared.callback is not None:
        try:
            send_callback(prepared.callback, result)
        except Exception as exc:
            err = ErrorInfo(
                code="delivery_failed", message=f"{type(exc).__name__}: {exc}", retryable=True
            )
            if attempt >= s.delivery_max_attempts:
                st.dead_letter(request_id, err)
                log.warning("dead-lettered", extra={"request_id": request_id, "attempts": attempt})
                return "dead letter"
            st.retry_delivery(
                request_id, err, due_at=time.time() + backoff_s(attempt, DELIVERY_POLICY)
            )
            log.info("delivery retry", extra={"request_id": request_id, "attempt": attempt})
            return "retry"
    st.delivered(request_id)
    return "delivered"
