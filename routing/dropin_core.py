"""What one drop-in call does, for either SDK, sync or async: ``routing.dropin``'s engine.

A call's SDK arguments become a mixbatch request (``Call.plan``); mixbatch's errors and failed
answers become the SDK's own errors, built as the SDK builds them, on a response of its own
HTTP library (``Call.errors``, ``Call.answer``); a good answer becomes the SDK's typed object.
The SDK is imported when a drop-in client is built, never at this module's import.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from inspect import Parameter, signature
from types import ModuleType
from typing import Any, Generic, TypeVar, cast

from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from routing.errors import (
    ConfigError,
    InvalidRequest,
    LaneFull,
    MixbatchError,
    NotFound,
    ResultTimeout,
    StoreUnavailable,
)
from routing.models import Result
from routing.states import State

__all__ = ["ANTHROPIC", "OPENAI", "Call", "Endpoint", "Plan", "Sdk"]

T = TypeVar("T")

#: The keys of ``extra_body["mixbatch"]``: per-call overrides of the client's defaults.
OPTIONS = frozenset({"lane", "deadline", "custom_id"})
#: Arguments every SDK ``create`` takes that shape the HTTP call, not the request body.
_TRANSPORT = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})
#: The SDKs' error classes by status (looked up by name: each SDK has its own set).
_STATUS_CLASSES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "ContentTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequestError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
    529: "OverloadedError",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    429: "rate_limit_error",
}
#: What a request that did not finish DONE answers with, when no provider status says more.
_OUTCOME_STATUS = {State.EXPIRED: 408, State.CANCELLED: 499}
_UNSET: Any = object()
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(frozen=True)
class Sdk:
    """One SDK: its package, the pip extra that installs it, how its errors look."""

    package: str
    extra: str
    request_id_header: str
    #: True: an error's ``body`` is the whole response body (Anthropic); else its "error" part.
    whole_error_body: bool

    def module(self) -> ModuleType:
        try:
            return importlib.import_module(self.package)
        except ImportError as exc:
            raise ImportError(
                f"routing.dropin needs the {self.package!r} package for this client: "
                f"pip install 'mixbatch[{self.extra}]'"
            ) from exc

    def http(self) -> ModuleType:
        """The HTTP library the SDK's errors hold responses of (httpx, or its fork httpx2)."""
        errors = importlib.import_module(f"{self.package}._exceptions")
        return cast(ModuleType, getattr(errors, "httpx2", None) or errors.httpx)

    def given(self, value: object) -> bool:
        """False for the SDK's "argument left out" markers (``NOT_GIVEN``, ``omit``)."""
        sdk = self.module()
        markers = tuple(
            c for c in (getattr(sdk, "NotGiven", None), getattr(sdk, "Omit", None)) if c
        )
        return not isinstance(value, markers)

    def error_body(self, status: int, message: str, code: str, param: str | None) -> dict[str, Any]:
        """An error response body in the provider's own shape."""
        kind = _ERROR_TYPES.get(status, "api_error")
        if self.whole_error_body:
            return {"type": "error", "error": {"type": kind, "message": message}}
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def is_error_body(self, body: object) -> bool:
        """Whether a provider's answer is already an error body of this SDK's shape."""
        if not isinstance(body, Mapping) or not isinstance(body.get("error"), Mapping):
            return False
        return body.get("type") == "error" if self.whole_error_body else True


OPENAI = Sdk("openai", "openai", "x-request-id", whole_error_body=False)
ANTHROPIC = Sdk("anthropic", "anthropic", "request-id", whole_error_body=True)


@dataclass(frozen=True)
class Endpoint(Generic[T]):
    """One SDK method: its mixbatch endpoint, the SDK resource whose ``create`` it stands for
    (its arguments are the ones accepted) and the SDK type of its answer ("module:Name",
    relative to the SDK package)."""

    sdk: Sdk
    path: str
    resource: str
    answer: str

    def arguments(self) -> tuple[frozenset[str], frozenset[str]]:
        """The SDK ``create``'s keyword arguments: (all of them, the required ones)."""
        return _arguments(self.sdk.package, self.resource)

    def answer_type(self) -> Any:
        return _attribute(self.sdk.package, self.answer)


@cache
def _attribute(package: str, where: str) -> Any:
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(f"{package}.{module}"), name)


@cache
def _arguments(package: str, resource: str) -> tuple[frozenset[str], frozenset[str]]:
    params = signature(_attribute(package, resource).create).parameters
    names = frozenset(params) - {"self"}
    required = frozenset(n for n in names if params[n].default is Parameter.empty)
    return names - _TRANSPORT, required


@dataclass(frozen=True)
class Plan(Generic[T]):
    """A call made ready: the mixbatch request's fields and how long to wait for its answer."""

    endpoint: Endpoint[T]
    fields: dict[str, Any] = field(repr=False)
    wait_s: float | None


class Call:
    """A drop-in client's defaults, and what it does with each call."""

    def __init__(
        self,
        sdk: Sdk,
        *,
        lane: str,
        deadline: datetime | float | str | timedelta | None,
        tenant: str | None,
        timeout: float | None,
    ) -> None:
        sdk.module()  # a missing SDK is an ImportError now, naming the extra, not at a call
        self.sdk, self.lane, self.deadline, self.tenant = sdk, lane, deadline, tenant
        self.timeout = timeout

    def plan(self, endpoint: Endpoint[T], params: dict[str, Any]) -> Plan[T]:
        """The request for one call; its arguments checked as the SDK checks them."""
        params = dict(params)
        extra_body = params.pop("extra_body", None) or {}
        wait = params.pop("timeout", _UNSET)
        params.pop("extra_headers", None)  # headers and query are the HTTP call's, not ours
        params.pop("extra_query", None)
        names, required = endpoint.arguments()
        unknown = sorted(set(params) - names)
        if unknown:
            raise TypeError(f"create() got an unexpected keyword argument {unknown[0]!r}")
        body = {k: _jsonable(v) for k, v in params.items() if self.sdk.given(v)}
        missing = sorted(required - set(body))
        if missing:
            raise TypeError(f"create() is missing required keyword arguments: {missing}")
        options = self._options(endpoint, extra_body)
        body.update((k, _jsonable(v)) for k, v in extra_body.items() if k != "mixbatch")
        if body.get("stream"):
            raise self._invalid(endpoint, "stream", "mixbatch answers whole responses")
        fields: dict[str, Any] = {
            "endpoint": endpoint.path,
            "body": body,
            "lane": options.get("lane", self.lane),
            "deadline": options.get("deadline", self.deadline),
        }
        if options.get("custom_id") is not None:
            fields["custom_id"] = options["custom_id"]
        if self.tenant is not None:
            fields["tenant"] = self.tenant
        return Plan(endpoint, fields, self._wait_s(wait))

    def _options(self, endpoint: Endpoint[Any], extra_body: object) -> Mapping[str, Any]:
        if not isinstance(extra_body, Mapping):
            raise self._invalid(endpoint, "extra_body", "must be an object")
        options = extra_body.get("mixbatch") or {}
        if not isinstance(options, Mapping):
            raise self._invalid(endpoint, "extra_body.mixbatch", "must be an object")
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            where, known = f"extra_body.mixbatch.{unknown[0]}", sorted(OPTIONS)
            raise self._invalid(endpoint, where, f"unknown option (one of {known})")
        return options

    def _wait_s(self, wait: Any) -> float | None:
        """The SDK's ``timeout`` as seconds to wait for the answer (None: no limit)."""
        if wait is _UNSET or not self.sdk.given(wait):
            return self.timeout
        if wait is None or isinstance(wait, int | float):
            return wait
        read = getattr(wait, "read", None)  # an httpx Timeout: its read timeout
        return float(read) if isinstance(read, int | float) else self.timeout

    @contextlib.contextmanager
    def errors(self, plan: Plan[Any]) -> Iterator[None]:
        """mixbatch's errors raised inside, as the SDK's own."""
        try:
            yield
        except MixbatchError as exc:
            raise self._translate(plan.endpoint, exc) from exc

    def _translate(self, endpoint: Endpoint[Any], exc: MixbatchError) -> Exception:
        sdk = self.sdk.module()
        request = _request(endpoint)
        if isinstance(exc, ResultTimeout):
            return cast(Exception, sdk.APITimeoutError(request=request))
        if isinstance(exc, StoreUnavailable | ConfigError):
            return cast(Exception, sdk.APIConnectionError(message=str(exc), request=request))
        if isinstance(exc, InvalidRequest):
            return self._invalid(endpoint, exc.field, str(exc), _snake(type(exc).__name__))
        status = 429 if isinstance(exc, LaneFull) else 404 if isinstance(exc, NotFound) else 500
        return self._status_error(endpoint, status, str(exc), _snake(type(exc).__name__))

    def answer(self, plan: Plan[T], result: Result) -> T:
        """The SDK's typed answer; a request that did not end DONE raises the SDK's error."""
        endpoint = plan.endpoint
        if result.status is not State.DONE or result.body is None:
            raise self._failure(endpoint, result)
        try:
            answer = endpoint.answer_type().model_validate(result.body)
        except ValidationError:
            response = self._response(endpoint, 200, result.body, result.id)
            sdk = self.sdk.module()
            raise sdk.APIResponseValidationError(response=response, body=result.body) from None
        answer._request_id = result.id  # what the SDK's answers carry: here mixbatch's id
        return cast(T, answer)

    def _failure(self, endpoint: Endpoint[Any], result: Result) -> Exception:
        error = result.error
        status = result.status_code or (error.status_code if error else None)
        status = status or _OUTCOME_STATUS.get(result.status, 502)
        message = error.message if error else f"request {result.id} ended {result.status}"
        code = error.code if error else result.status.value
        body = result.body if self.sdk.is_error_body(result.body) else None
        return self._status_error(endpoint, status, message, code, request_id=result.id, body=body)

    def _invalid(
        self, endpoint: Endpoint[Any], param: str | None, message: str, code: str = "invalid"
    ) -> Exception:
        text = (
            message if param is None or message.startswith(f"{param}:") else f"{param}: {message}"
        )
        return self._status_error(endpoint, 400, text, code, param=param)

    def _status_error(
        self,
        endpoint: Endpoint[Any],
        status: int,
        message: str,
        code: str,
        *,
        param: str | None = None,
        request_id: str | None = None,
        body: object = None,
    ) -> Exception:
        """The SDK's error for an HTTP status, built as the SDK builds it from a response."""
        if body is None:
            body = self.sdk.error_body(status, message, code, param)
        response = self._response(endpoint, status, body, request_id)
        sdk = self.sdk.module()
        name = _STATUS_CLASSES.get(status)
        fallback = sdk.InternalServerError if status >= 500 else sdk.APIStatusError
        cls = getattr(sdk, name, None) if name else None
        # As the SDKs do: OpenAI's errors keep the body's "error" object, Anthropic's the body.
        data = body
        if isinstance(body, Mapping) and not self.sdk.whole_error_body:
            data = body.get("error", body)
        error = (cls or fallback)(f"Error code: {status} - {body}", response=response, body=data)
        return cast(Exception, error)

    def _response(
        self, endpoint: Endpoint[Any], status: int, body: object, request_id: str | None
    ) -> Any:
        headers = {self.sdk.request_id_header: request_id} if request_id else {}
        return self.sdk.http().Response(
            status, json=body, headers=headers, request=_request(endpoint)
        )


def _request(endpoint: Endpoint[Any]) -> Any:
    """The request an error names: the endpoint, asked of mixbatch rather than a provider."""
    return endpoint.sdk.http().Request("POST", f"mixbatch://mixbatch{endpoint.path}")


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


def _jsonable(value: Any) -> Any:
    """An SDK argument as JSON: typed dicts pass as they are, models and any iterable (the SDK
    accepts generators of messages) become plain values."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping | list | tuple):
        value = list(value)
    return to_jsonable_python(value)
