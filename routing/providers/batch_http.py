"""The HTTP mechanics under every batch adapter: one verb with retries, JSON replies, downloads.

Every failure goes through ``routing.providers.base``'s mapping (``map_transport_errors``,
``error_for_response``) and every retry through ``retry_call``, so a batch poll and a realtime
call mean the same thing by "retryable". Polls, lists, downloads and deletes are retried on 429,
5xx and broken connections; a step that is not idempotent (a create) is retried only when it
certainly reached nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Generator
from contextlib import ExitStack
from typing import Any
from urllib.parse import quote

import httpx

from routing.decide.backoff import DEFAULT_POLICY, RetryPolicy, next_delay_s
from routing.errors import ProviderError
from routing.providers.base import (
    AccountClient,
    ProviderAccount,
    map_transport_errors,
    retry_call,
)

__all__ = ["BatchTransport"]

logger = logging.getLogger(__name__)


class BatchTransport(AccountClient):
    """An account's HTTP client with the batch verbs' retry rule.

    Retries follow ``policy`` within ``budget_s`` seconds per verb (see ``retry_call``);
    ``sleep``, ``clock`` and ``rng`` are there so tests can pin the waits.
    """

    def __init__(
        self,
        account: ProviderAccount,
        *,
        client: httpx.Client | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        budget_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(account, client)
        self.policy = policy
        self.budget_s = budget_s
        self._sleep = sleep
        self._clock = clock
        self._rng = rng

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.account.base_url + path

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
                raise self._error_for(method, path, response)
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

    def _stream_lines(self, path: str) -> Generator[tuple[int, str], None, None]:
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
                    if response.status_code >= 400:
                        response.read()
                        raise self._error_for("GET", path, response)
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
