"""The seam between mixbatch and a provider's batch API: one interface, two wire protocols.

``BatchAdapter`` is what the submit, poll and collect tasks call; they never learn whether
OpenAI's Files + Batch API or Anthropic's Message Batches is behind it. Its public verbs do the
bookkeeping (checking a file against the account's caps, retrying, following pages, restarting
a broken download, normalising statuses); a protocol subclass only says which paths to hit and
how to read the replies. Every failure goes through ``routing.providers.base``'s mapping
(``map_transport_errors``, ``error_for_response``) and every retry through ``retry_call``, so a
batch poll and a realtime call mean the same thing by "retryable".

Statuses are normalised to ``BatchStatus``. Anthropic's three (``in_progress``, ``canceling``,
``ended``) map onto it with the request counts: an ended batch whose cancel was asked is
``CANCELLED``, one with expired requests ``EXPIRED``, any other ``COMPLETED`` (Anthropic has no
batch-level failure; bad params come back as errored lines). ``raw_status`` keeps the
provider's own word.

Idempotence: polls, lists, downloads and deletes are retried on 429, 5xx and broken
connections. A create is retried only when it certainly created nothing (an error reply, or a
connection never made); a create whose reply was lost raises at once, retryable, with a note,
because the batch may exist: the caller then runs ``find_orphan`` before creating again.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from routing.decide.backoff import DEFAULT_POLICY, RetryPolicy, next_delay_s
from routing.errors import ConfigError, InvalidRequest, MalformedInput, ProviderError
from routing.models import Endpoint, ErrorInfo
from routing.providers.base import (
    RETRYABLE_STATUSES,
    ProviderAccount,
    error_for_response,
    map_transport_errors,
    redact_secret,
    retry_call,
)
from routing.providers.capabilities import ProviderCapabilities

__all__ = [
    "TERMINAL_BATCH_STATUSES",
    "BatchAdapter",
    "BatchJob",
    "BatchStatus",
    "LineError",
    "LineResult",
    "batch_adapter_for",
    "iter_input_lines",
    "parse_timestamp",
]

logger = logging.getLogger(__name__)

_NO_RESPONSE_CODES = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
_CLIENT_FAULT_HINTS = ("invalid", "not_found", "unsupported", "mismatch", "too_large", "too_long")


class BatchStatus(StrEnum):
    """A batch's phase, the same words for every provider (OpenAI's, which are the richest)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: Nothing more will happen to the batch: read its results (expired and cancelled batches
#: keep the lines that finished) and stop polling.
TERMINAL_BATCH_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class LineError(BaseModel):
    """Why a batch failed validation, per input line where the provider says which (1-based)."""

    model_config = ConfigDict(frozen=True)

    line: int | None = None
    custom_id: str | None = None
    code: str
    message: str


class BatchJob(BaseModel):
    """A provider batch as last seen. Times are unix seconds.

    ``failed`` counts lines that did not succeed (for Anthropic: errored, cancelled and expired,
    known only once the batch ends). ``input_ref``, ``output_ref`` and ``error_ref`` are file ids
    (OpenAI) or, for Anthropic, the ``results_url`` in ``output_ref``.
    """

    model_config = ConfigDict(frozen=True)

    provider: str
    batch_id: str
    status: BatchStatus
    raw_status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: float
    ended_at: float | None = None
    expires_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    validation_errors: list[LineError] = Field(default_factory=list)
    input_ref: str | None = None
    output_ref: str | None = None
    error_ref: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_BATCH_STATUSES


class LineResult(BaseModel):
    """One line of a batch's results, joined to its request by ``custom_id``.

    ``body`` is the provider's reply (its error envelope for a failed line). ``error.code`` is
    ``"expired"`` or ``"cancelled"`` for a line that never ran, on every provider, so the caller
    can re-route it; ``error.retryable`` follows the HTTP rule (429, 408, 409, 5xx) otherwise.
    """

    model_config = ConfigDict(frozen=True)

    custom_id: str
    status_code: int | None = None
    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_timestamp(value: object) -> float | None:
    """Unix seconds from an int (OpenAI), an ISO-8601 or RFC 3339 string (Anthropic, Together)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iter_input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the newline) of each non-blank line, read lazily."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def http_retryable(status: int) -> bool:
    """The rule ``error_for_response`` applies to whole replies, for one line's status."""
    return status in RETRYABLE_STATUSES or status >= 500


def no_response_error(code: str, message: str) -> ErrorInfo:
    """A line that never got an HTTP reply: expiry, cancel, a timeout inside the provider.

    Such a line did not run, so trying it again (elsewhere) may help, unless its code says the
    request itself was bad.
    """
    mapped = _NO_RESPONSE_CODES.get(code, code)
    retryable = not any(hint in mapped for hint in _CLIENT_FAULT_HINTS)
    return ErrorInfo(code=mapped, message=message, retryable=retryable)


class BatchAdapter(abc.ABC):
    """One provider account's batch API. Public verbs do bookkeeping; subclasses do the wire.

    Retries follow ``policy`` within ``budget_s`` seconds per verb (see ``retry_call``);
    ``sleep``, ``clock`` and ``rng`` are there so tests can pin the waits. Pass ``client`` to
    share a connection pool; the adapter closes only a client it created.
    """

    kind: ClassVar[str]
    endpoints: ClassVar[frozenset[Endpoint]]
    request_id_header: ClassVar[str] = "x-request-id"
    page_limit_max: ClassVar[int] = 100

    def __init__(
        self,
        account: ProviderAccount,
        capabilities: ProviderCapabilities,
        *,
        client: httpx.Client | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        budget_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if account.kind != self.kind or capabilities.protocol != self.kind:
            raise ConfigError(
                f"{type(self).__name__} speaks the {self.kind!r} protocol, but account "
                f"{account.name!r} is {account.kind!r} and its capabilities say "
                f"{capabilities.protocol!r}; use batch_adapter_for(account, capabilities)"
            )
        capabilities.require_batch()
        self.account = account
        self.capabilities = capabilities
        self.policy = policy
        self.budget_s = budget_s
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=account.timeout_s)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.account.name!r}, base_url={self.account.base_url!r})"
        )

    # -- the wire, per protocol ------------------------------------------------------------

    @abc.abstractmethod
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate and version a request (the only place the key is read)."""
        ...

    @abc.abstractmethod
    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        """Submit; returns the batch and the provider's request id of the creating call."""
        ...

    @abc.abstractmethod
    def _batch_path(self, batch_id: str) -> str: ...

    @abc.abstractmethod
    def _job(self, obj: dict[str, Any]) -> BatchJob: ...

    @abc.abstractmethod
    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        """One page of batches, newest first, and the query of the next page (None: last)."""
        ...

    @abc.abstractmethod
    def _result_paths(self, job: BatchJob) -> list[str]: ...

    @abc.abstractmethod
    def _line_result(self, obj: dict[str, Any]) -> LineResult | None: ...

    @abc.abstractmethod
    def _delete(self, job: BatchJob) -> None: ...

    @abc.abstractmethod
    def _orphan_match(self, job: BatchJob, key: str, value: str, total: int) -> bool: ...

    # -- public verbs ----------------------------------------------------------------------

    def resolve_endpoint(self, endpoint: Endpoint | str) -> Endpoint:
        """``endpoint`` as an ``Endpoint`` this protocol batches, else a non-retryable error."""
        try:
            value: Endpoint | None = Endpoint(endpoint)
        except ValueError:
            value = None
        if value is None or value not in self.endpoints:
            supported = ", ".join(sorted(e.value for e in self.endpoints))
            raise ProviderError(
                f"{self.account.name} ({self.kind}) has no batch endpoint {str(endpoint)!r} "
                f"(supported: {supported})",
                retryable=False,
            )
        return value

    def create(
        self,
        jsonl_path: Path | str,
        *,
        endpoint: Endpoint | str,
        model: str,
        metadata: dict[str, str] | None = None,
        window: str | None = None,
    ) -> BatchJob:
        """Submit the OpenAI-format JSONL file at ``jsonl_path`` as one batch.

        The file is checked against the account's caps first (lines, bytes, longest line) and
        streamed, never read whole. ``window`` defaults to the account's first window.
        Record the returned ``batch_id`` before anything else; see the module docstring for
        what a lost reply means.
        """
        path = Path(jsonl_path)
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a readable file", field="jsonl_path")
        target = self.resolve_endpoint(endpoint)
        self.capabilities.require_model(model)
        chosen = self.capabilities.window(window)
        try:
            job, request_id = self._create(path, target, model, dict(metadata or {}), chosen)
        except ProviderError as exc:
            if exc.retryable and exc.status_code is None:
                exc.add_note(
                    "mixbatch: the batch may have been created; look for it with find_orphan "
                    "before creating it again"
                )
            raise
        logger.info(
            "%s created batch %s (%s) from %s",
            self.account.name,
            job.batch_id,
            job.raw_status,
            path.name,
            extra={
                "provider": self.account.name,
                "batch_id": job.batch_id,
                "provider_request_id": request_id,
                "endpoint": target.value,
                "model": model,
            },
        )
        return job

    def retrieve(self, batch_id: str) -> BatchJob:
        return self._job(self._json_object("GET", self._batch_path(batch_id)))

    def list(self, *, limit: int = 100, created_after: float | None = None) -> Iterator[BatchJob]:
        """Every batch of the account, newest first, following pages of ``limit`` each.

        With ``created_after`` (unix seconds) only batches created then or later; paging stops
        at the first page that reaches past it. Provider times are whole seconds, so the bound
        is rounded down.
        """
        size = max(1, min(limit, self.page_limit_max))
        floor = math.floor(created_after) if created_after is not None else None
        cursor: dict[str, str] | None = None
        while True:
            jobs, cursor = self._list_page(size, cursor)
            for job in jobs:
                if floor is None or job.created_at >= floor:
                    yield job
            if cursor is None or not jobs:
                return
            if floor is not None and min(job.created_at for job in jobs) < floor:
                return

    def cancel(self, batch_id: str) -> BatchJob:
        """Ask the provider to stop; the batch goes ``CANCELLING``, then ``CANCELLED``.

        A batch that ended before the cancel arrived is refused by the provider (a 400 or 409);
        that race is not an error for the caller, so the batch is returned as it ended.
        """
        if not self.capabilities.cancel:
            raise ProviderError(
                f"provider account {self.account.name!r} cannot cancel batches "
                "(cancel = false in its capabilities)",
                retryable=False,
            )
        try:
            return self._job(self._json_object("POST", self._batch_path(batch_id) + "/cancel"))
        except ProviderError as exc:
            if exc.status_code not in (400, 409):
                raise
            job = self.retrieve(batch_id)
            if not (job.terminal or job.status is BatchStatus.CANCELLING):
                raise
            logger.info(
                "%s batch %s is already %s; nothing to cancel",
                self.account.name,
                batch_id,
                job.status.value,
                extra={"provider": self.account.name, "batch_id": batch_id},
            )
            return job

    def results(self, job: BatchJob) -> Iterator[LineResult]:
        """Every line of a finished batch's results, streamed, in the provider's order.

        OpenAI: the output file, then the error file (both may exist; either may be missing).
        A download that breaks is started again and the lines already given are skipped, so a
        caller sees each line once. A line that is not JSON is logged and skipped: callers join
        on ``custom_id`` and must treat a request with no line as not run.
        """
        for path in self._result_paths(job):
            for number, text in self._stream_lines(path):
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                result = self._line_result(obj) if isinstance(obj, dict) else None
                if result is None:
                    logger.error(
                        "%s batch %s: results line %d is not a result line; skipped",
                        self.account.name,
                        job.batch_id,
                        number,
                        extra={"provider": self.account.name, "batch_id": job.batch_id},
                    )
                    continue
                yield result

    def delete_inputs_outputs(self, job: BatchJob) -> None:
        """Remove what the provider keeps of a finished batch; already gone counts as done."""
        if not job.terminal:
            raise ProviderError(
                f"{self.account.name} batch {job.batch_id} is {job.status.value}: cancel it and "
                "wait for it to end before deleting its files",
                retryable=False,
            )
        self._delete(job)

    def find_orphan(
        self,
        metadata_key_value: tuple[str, str],
        *,
        created_after: float,
        total: int,
        exclude: Collection[str] = (),
    ) -> BatchJob | None:
        """The batch a create made but never recorded (a crash, a lost reply), or None.

        OpenAI-style accounts match ``metadata[key] == value``, which the submit step tags
        every batch with. Anthropic batches carry no metadata, so there the match is a
        heuristic: a batch created at or after ``created_after`` with ``total`` requests, not
        among ``exclude`` (ids already recorded); the caller must check the ``custom_id``s when
        its results arrive. With several matches the oldest is returned and the others logged.
        """
        key, value = metadata_key_value
        matches = [
            job
            for job in self.list(created_after=created_after)
            if job.batch_id not in exclude and self._orphan_match(job, key, value, total)
        ]
        if not matches:
            return None
        matches.sort(key=lambda job: job.created_at)
        if len(matches) > 1:
            logger.warning(
                "%s: %d batches match %s=%s; taking %s",
                self.account.name,
                len(matches),
                key,
                value,
                matches[0].batch_id,
                extra={
                    "provider": self.account.name,
                    "batch_ids": [job.batch_id for job in matches],
                },
            )
        return matches[0]

    # -- shared mechanics ------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.account.base_url + path

    def _redact(self, text: str) -> str:
        return redact_secret(text, self.account.api_key)

    def _quote(self, batch_id: str) -> str:
        return quote(batch_id, safe="")

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: object = None,
        prepare: Callable[[ExitStack], dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
        missing_ok: bool = False,
    ) -> httpx.Response:
        """One verb with retries: ``prepare`` builds a fresh body per try (reopened files)."""
        where = f"{self.account.name} {method} {path}"
        url = self._url(path)
        sent = [True]

        def once(timeout_s: float) -> httpx.Response:
            sent[0] = True
            with ExitStack() as stack:
                extra = prepare(stack) if prepare is not None else {}
                request = self._client.build_request(
                    method,
                    url,
                    params=params,
                    json=json_body,
                    headers={
                        "accept": "application/json",
                        **(headers or {}),
                        **self.auth_headers(),
                    },
                    timeout=timeout_s,
                    **extra,
                )
                with map_transport_errors(where, timeout_s, self._redact):
                    try:
                        response = self._client.send(request)
                    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
                        sent[0] = False
                        raise
            request_id = response.headers.get(self.request_id_header)
            if response.status_code >= 400 and not (missing_ok and response.status_code == 404):
                raise error_for_response(
                    self.account.name,
                    path,
                    response,
                    request_id=request_id,
                    now=time.time(),
                    redact=self._redact,
                    method=method,
                )
            logger.debug(
                "%s -> %d",
                where,
                response.status_code,
                extra={
                    "provider": self.account.name,
                    "endpoint": path,
                    "status_code": response.status_code,
                    "provider_request_id": request_id,
                },
            )
            return response

        def may_retry(exc: ProviderError) -> bool:
            return idempotent or exc.status_code is not None or not sent[0]

        return retry_call(
            once,
            provider=self.account.name,
            where=where,
            endpoint=path,
            timeout_s=self.account.timeout_s,
            policy=self.policy,
            budget_s=self.budget_s,
            sleep=self._sleep,
            clock=self._clock,
            rng=self._rng,
            may_retry=may_retry,
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> object:
        return self._json_reply(method, path, **kwargs)[0]

    def _json_reply(self, method: str, path: str, **kwargs: Any) -> tuple[object, str | None]:
        """The parsed reply and the provider's request id."""
        response = self._send(method, path, **kwargs)
        request_id = response.headers.get(self.request_id_header)
        try:
            return response.json(), request_id
        except ValueError:
            raise ProviderError(
                f"{self.account.name} {method} {path} -> {response.status_code}: "
                "the reply is not JSON",
                status_code=response.status_code,
                retryable=False,
                provider_request_id=request_id,
            ) from None

    def _json_object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._object_reply(method, path, **kwargs)[0]

    def _object_reply(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[dict[str, Any], str | None]:
        body, request_id = self._json_reply(method, path, **kwargs)
        if not isinstance(body, dict):
            raise ProviderError(
                f"{self.account.name} {method} {path}: the reply is not a JSON object",
                retryable=False,
                provider_request_id=request_id,
            )
        return body, request_id

    def _stream_lines(self, path: str) -> Iterator[tuple[int, str]]:
        """(line number, text) of a results file, restarting a broken download from the top.

        A results file does not change once written, so line ``n`` of a second download is
        line ``n`` of the first: lines already yielded are skipped rather than repeated. Tries
        count only failures in a row without progress, so a long file on a flaky link still
        finishes, while a download that never gets further gives up after ``max_tries``.
        """
        where = f"{self.account.name} GET {path}"
        url = self._url(path)
        yielded = 0
        failures = 0
        timeout_s = self.account.timeout_s
        headers = {"accept": "application/binary", **self.auth_headers()}
        while True:
            before = yielded
            seen = 0
            try:
                with (
                    map_transport_errors(where, timeout_s, self._redact),
                    self._client.stream("GET", url, headers=headers, timeout=timeout_s) as response,
                ):
                    request_id = response.headers.get(self.request_id_header)
                    if response.status_code >= 400:
                        response.read()
                        raise error_for_response(
                            self.account.name,
                            path,
                            response,
                            request_id=request_id,
                            now=time.time(),
                            redact=self._redact,
                            method="GET",
                        )
                    for line in response.iter_lines():
                        if not line.strip():
                            continue
                        seen += 1
                        if seen <= yielded:
                            continue
                        yielded = seen
                        yield seen, line
                return
            except ProviderError as exc:
                failures = 1 if yielded > before else failures + 1
                delay = next_delay_s(exc, failures, self.policy, self._rng)
                if delay is None:
                    exc.add_note(f"mixbatch: download stopped after {yielded} lines")
                    raise
                logger.warning(
                    "%s broke after %d lines (%s), starting again in %.2f s",
                    where,
                    yielded,
                    type(exc).__name__,
                    delay,
                    extra={
                        "provider": self.account.name,
                        "endpoint": path,
                        "provider_request_id": exc.provider_request_id,
                        "status_code": exc.status_code,
                        "lines_done": yielded,
                        "attempt": failures,
                        "delay_s": round(delay, 3),
                    },
                )
                self._sleep(delay)

    def _check_size(self, path: Path, lines: int, size: int, longest: int, longest_at: int) -> None:
        """Refuse a file over the account's caps: the planner should have split it."""
        cap = self.capabilities
        where = f"{path.name} for {self.account.name}"
        if lines == 0:
            raise InvalidRequest(f"{where}: the file holds no request lines", field="jsonl_path")
        if lines > cap.max_lines:
            raise InvalidRequest(
                f"{where}: {lines} lines, over max_lines {cap.max_lines}; split the batch",
                field="jsonl_path",
            )
        if size > cap.max_bytes:
            raise InvalidRequest(
                f"{where}: {size} bytes, over max_bytes {cap.max_bytes}; split the batch",
                field="jsonl_path",
            )
        if longest > cap.max_line_bytes:
            raise MalformedInput(
                f"{longest} bytes, over max_line_bytes {cap.max_line_bytes} of {self.account.name}",
                line=longest_at,
                source=path.name,
            )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> BatchAdapter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def scan_sizes(lines: Iterable[tuple[int, bytes]]) -> tuple[int, int, int]:
    """(line count, longest line's bytes, its line number) in one pass."""
    count = longest = longest_at = 0
    for number, line in lines:
        count += 1
        if len(line) > longest:
            longest, longest_at = len(line), number
    return count, longest, longest_at


def batch_adapter_for(
    account: ProviderAccount, capabilities: ProviderCapabilities, **options: Any
) -> BatchAdapter:
    """The batch adapter for the account's protocol; ``options`` go to its constructor."""
    from routing.providers.anthropic_batch import AnthropicBatchAdapter
    from routing.providers.openai_batch import OpenAIBatchAdapter

    adapters: dict[str, type[BatchAdapter]] = {
        OpenAIBatchAdapter.kind: OpenAIBatchAdapter,
        AnthropicBatchAdapter.kind: AnthropicBatchAdapter,
    }
    return adapters[capabilities.protocol](account, capabilities, **options)
