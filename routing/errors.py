"""mixbatch's own error tree; SDK, HTTP and Redis errors are translated once, at the edge.

Every class of the project that raises on purpose, with the module it lives in (here when
none is named)::

    MixbatchError
    ├── InvalidRequest            bad input from a producer (names the field)
    │   ├── UnknownLane
    │   ├── UnknownEndpoint
    │   ├── DeadlineInPast
    │   ├── BodyTooLarge
    │   ├── MalformedInput        a bad JSONL file (names the line)
    │   └── RequestError          gpu_worker.errors: one local request cannot be served
    │       └── UnknownModel      gpu_worker.errors: no local model of that name
    ├── LaneFull                  backpressure: the lane is at max_queued (carries the
    │                             tickets accepted before it filled and the refused indices)
    ├── NotFound                  no request with that id (also a KeyError)
    │   └── NoDeadLetter          tasks.cli.dlq: no dead letter with that id
    ├── ResultTimeout             result(id, timeout) ran out (also a TimeoutError)
    ├── SemaphoreBusy             every realtime slot stayed taken for the whole wait
    ├── StoreUnavailable          Redis cannot be reached
    │   └── ReplicationTimeout    too few replicas acknowledged a submit (not accepted)
    ├── ConfigError               settings, lanes file or environment are wrong
    │   └── QuantileError         routing.decide.estimates: a quantile outside (0, 1)
    ├── ProviderError             a provider answered badly (retryable or not)
    │   ├── RateLimited           429, carries retry_after_s
    │   └── ProviderTimeout
    ├── DeliveryError             routing.sinks.base: a sink could not apply a result
    │   ├── PayloadTooLarge       routing.sinks.base: over the sink's size limit
    │   └── AddressRefused        routing.sinks.base: a webhook address the service refuses
    └── TargetError               routing.contrib.answers: a result's custom_id names no row

Outside the tree, because they never leave their module: the sandbox's protocol errors, each
rendered as an HTTP answer in the provider's shape (``routing.sandbox.app.ApiError``,
``routing.sandbox.batch_records.BatchRequestError``, ``routing.sandbox.answers.InvalidBody``,
``routing.sandbox.state.BadSandboxHeader``), and ``routing.contrib.flask._AlreadyApplied``,
which rolls back the transaction of a delivery already applied.

Every error a worker can hit says whether retrying may help (``retryable``), so the retry
policy lives in one place and never inspects exception types of third-party libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routing.models import Ticket


class MixbatchError(Exception):
    """Base of every error mixbatch raises on purpose."""

    retryable: bool = False


class InvalidRequest(MixbatchError, ValueError):
    """The producer sent something mixbatch cannot accept; nothing was enqueued."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class UnknownLane(InvalidRequest):
    pass


class UnknownEndpoint(InvalidRequest):
    pass


class DeadlineInPast(InvalidRequest):
    pass


class BodyTooLarge(InvalidRequest):
    pass


class MalformedInput(InvalidRequest):
    """A line of an input file is unusable; ``line`` is 1-based."""

    def __init__(self, message: str, *, line: int, source: str = "input") -> None:
        self.line = line
        self.source = source
        super().__init__(f"{source}, line {line}: {message}")


class LaneFull(MixbatchError):
    """Backpressure: the lane already holds ``max_queued`` requests.

    A bulk submit keeps what fitted: ``accepted`` holds those tickets and ``rejected`` the
    indices (into the caller's items) that were refused, so resubmitting just those is safe.
    """

    retryable = True

    def __init__(
        self,
        lane: str,
        max_queued: int,
        *,
        accepted: Sequence[Ticket] = (),
        rejected: Sequence[int] = (),
    ) -> None:
        self.lane = lane
        self.max_queued = max_queued
        self.accepted: list[Ticket] = list(accepted)
        self.rejected: list[int] = list(rejected)
        super().__init__(
            f"lane {lane!r} is full ({max_queued} queued, its max_queued); "
            "retry later or raise max_queued in the lanes file"
        )


class NotFound(MixbatchError, KeyError):
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(request_id)

    def __str__(self) -> str:
        return f"no request with id {self.request_id!r} (unknown, or its result expired)"


class StoreUnavailable(MixbatchError):
    """Redis cannot be reached; the message names the URL without its password."""

    retryable = True


class ReplicationTimeout(StoreUnavailable):
    """Fewer replicas than MIXBATCH_REDIS_MIN_REPLICAS acknowledged a submit in time."""


class ConfigError(MixbatchError):
    """A setting, environment variable or lanes file is wrong; the message names it."""


class ProviderError(MixbatchError):
    """A provider call failed. ``retryable`` follows the status: 429, 5xx and timeouts are."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        body: object = None,
        provider_request_id: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.body = body
        self.provider_request_id = provider_request_id
        super().__init__(message)


class RateLimited(ProviderError):
    pass


class ProviderTimeout(ProviderError):
    pass


class ResultTimeout(MixbatchError, TimeoutError):
    """``result(id, timeout=...)`` ran out before the request finished; it is still in flight."""

    def __init__(self, request_id: str, timeout_s: float, state: str) -> None:
        self.request_id = request_id
        self.state = state
        super().__init__(f"request {request_id} still {state} after waiting {timeout_s:g}s")


class SemaphoreBusy(MixbatchError, TimeoutError):
    """Every slot stayed taken for the whole wait. Retryable: slots free up as calls finish."""

    retryable = True

    def __init__(self, key: str, limit: int, waited_s: float) -> None:
        self.key = key
        self.limit = limit
        self.waited_s = waited_s
        super().__init__(
            f"all {limit} slots of semaphore {key!r} stayed taken for {waited_s:.2f} s; "
            "raise the provider's max_concurrency or give the wait more time"
        )
