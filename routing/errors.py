"""mixbatch's own error tree; SDK, HTTP and Redis errors are translated once, at the edge.

    MixbatchError
    ├── InvalidRequest          bad input from a producer (names the field)
    │   ├── UnknownLane
    │   ├── UnknownEndpoint
    │   ├── DeadlineInPast
    │   ├── BodyTooLarge
    │   └── MalformedInput      a bad JSONL file (names the line)
    ├── LaneFull                backpressure: the lane is at max_queued
    ├── NotFound                no request with that id
    ├── ResultTimeout           result(id, timeout) ran out
    ├── StoreUnavailable        Redis cannot be reached
    ├── ConfigError             settings, lanes file or environment are wrong
    └── ProviderError           a provider answered badly (retryable or not)
        ├── RateLimited         429, carries retry_after_s
        └── ProviderTimeout

Every error a worker can hit says whether retrying may help (``retryable``), so the retry
policy lives in one place and never inspects exception types of third-party libraries.
"""

from __future__ import annotations


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
    """Backpressure: the lane already holds ``max_queued`` requests."""

    retryable = True

    def __init__(self, lane: str, max_queued: int) -> None:
        self.lane = lane
        self.max_queued = max_queued
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
