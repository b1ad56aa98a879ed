"""The sandbox provider's starlette app: OpenAI- and Anthropic-shaped endpoints on loopback.

Every provider endpoint goes through :func:`provider_route`, which counts the call, adds latency,
checks that some API key is present and renders errors in the provider's own shape, so a new
protocol (files, batches) only writes its handler and appends its routes in
:func:`default_routes`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routing.decide.cost import base_model
from routing.sandbox import answers
from routing.sandbox.knobs import Knobs
from routing.sandbox.state import TIMEOUT, BadSandboxHeader, SandboxState

Provider = Literal["openai", "anthropic"]

SANDBOX_HEADER = "x-mixbatch-sandbox"

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}


class ApiError(Exception):
    """An error answer; rendered in the shape of the provider whose endpoint was called."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        super().__init__(message)


def provider_of(path: str) -> Provider:
    """Which provider's shapes a path speaks; the Anthropic API lives under /v1/messages."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def error_response(provider: Provider, error: ApiError) -> JSONResponse:
    """``error`` in the body shape the provider's SDK parses into its own exception types."""
    body: dict[str, Any]
    if provider == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(error.status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
    else:
        kind = _OPENAI_ERROR_TYPES.get(error.status, "server_error")
        body = {
            "error": {
                "message": error.message,
                "type": kind,
                "param": error.param,
                "code": error.code,
            }
        }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def fault_error(kind: str, retry_after_s: float) -> ApiError:
    """The error answer of an injected fault (any kind but a timeout)."""
    status = int(kind)
    if status == 429:
        return ApiError(
            429,
            "Rate limit reached (injected by the mixbatch sandbox).",
            code="rate_limit_exceeded",
            headers={"retry-after": _format_seconds(retry_after_s)},
        )
    return ApiError(status, f"Server error {status} (injected by the mixbatch sandbox).")


@dataclass
class Call:
    """One provider call in flight, with the helpers every handler needs."""

    request: Request
    state: SandboxState
    provider: Provider
    endpoint: str

    async def json(self) -> Any:
        """The JSON request body; a 400 in provider shape if it is not JSON."""
        raw = await self.request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc

    async def apply_faults(self, body: object) -> None:
        """Fail this call as the knobs and headers say, or hang, or return to answer it."""
        try:
            kind = self.state.choose_fault(self.endpoint, body, self.request.headers)
        except BadSandboxHeader as exc:
            raise ApiError(400, str(exc), param=exc.header) from exc
        if kind == TIMEOUT:
            await self.state.pause(self.state.knobs.hang_s)
        elif kind is not None:
            raise fault_error(kind, self.state.knobs.retry_after_s)


Handler = Callable[[Call], Awaitable[Response | dict[str, Any]]]


def _has_api_key(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (scheme.lower() == "bearer" and bool(token.strip())) or bool(
        request.headers.get("x-api-key", "").strip()
    )


def _missing_key_error(provider: Provider) -> ApiError:
    if provider == "anthropic":
        return ApiError(401, "x-api-key header is required")
    return ApiError(
        401,
        "You didn't provide an API key. Any key works with the mixbatch sandbox, "
        "e.g. 'Authorization: Bearer sk-sandbox'.",
    )


def provider_route(
    path: str,
    handler: Handler,
    *,
    provider: Provider | None = None,
    methods: Sequence[str] = ("POST",),
) -> Route:
    """A route speaking a provider's protocol: counted, delayed, key-checked, errors shaped."""
    speaks = provider or provider_of(path)

    async def endpoint(request: Request) -> Response:
        state: SandboxState = request.app.state.sandbox
        state.record_call(path)
        request_id = f"req_{uuid.uuid4().hex}"
        ids = {"x-request-id": request_id, "request-id": request_id}
        try:
            await state.pause(state.latency_s(request.headers))
            if not _has_api_key(request):
                raise _missing_key_error(speaks)
            result = await handler(Call(request, state, speaks, path))
        except BadSandboxHeader as exc:
            result = error_response(speaks, ApiError(400, str(exc), param=exc.header))
        except ApiError as exc:
            result = error_response(speaks, exc)
        except ClientDisconnect:
            return Response(status_code=499)
        if isinstance(result, dict):
            result = JSONResponse(result)
        result.headers.update(ids)
        return result

    return Route(path, endpoint, methods=list(methods), name=path)


def answer_handler(endpoint: str) -> Handler:
    """The synchronous handler of one of :data:`answers.ENDPOINTS`."""

    async def handle(call: Call) -> dict[str, Any]:
        body = await call.json()
        try:
            answers.validate_body(endpoint, body)
        except answers.InvalidBody as exc:
            raise ApiError(400, exc.message, param=exc.field) from exc
        await call.apply_faults(body)
        tier = await _service_tier(call, endpoint, body)
        answer = answers.respond(endpoint, body)
        if tier is not None:
            answer["service_tier"] = tier
        return answer

    return handle


async def _service_tier(call: Call, endpoint: str, body: dict[str, Any]) -> str | None:
    """The tier an OpenAI-shaped call is served at, as OpenAI echoes it (None: not echoed).

    Flex is slower (``flex_latency_ms``), sheds load (``flex_rate_429``, Groq's
    ``flex_rate_498``) and is refused with a 400 for a model outside ``flex_models``.
    """
    if endpoint not in (answers.CHAT_COMPLETIONS, answers.RESPONSES):
        return None
    asked = body.get("service_tier") or "default"
    if asked != "flex":
        return "default" if asked == "auto" else str(asked)
    knobs = call.state.knobs
    model = str(body.get("model", ""))
    if model not in knobs.flex_models and base_model(model) not in knobs.flex_models:
        raise ApiError(
            400, f"Flex processing is not available for model {model!r}.", param="service_tier"
        )
    await call.state.pause(knobs.flex_latency_ms / 1000)
    shed = call.state.choose_flex_shed()
    if shed == "429":
        raise ApiError(
            429,
            "Resource Unavailable: flex capacity is short (injected by the mixbatch sandbox).",
            code="resource_unavailable",
            headers={"retry-after": _format_seconds(knobs.retry_after_s)},
        )
    if shed == "498":
        raise ApiError(
            498,
            "capacity_exceeded: flex tier at capacity (injected by the mixbatch sandbox).",
            code="capacity_exceeded",
        )
    return "flex"


def sync_routes() -> list[BaseRoute]:
    """The synchronous OpenAI and Anthropic endpoints."""
    return [provider_route(path, answer_handler(path)) for path in answers.ENDPOINTS]


async def _get_knobs(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    return JSONResponse(state.knobs.model_dump())


async def _post_knobs(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    try:
        changes = json.loads(await request.body() or b"{}")
        if not isinstance(changes, dict):
            raise ValueError("knobs must be a JSON object")
        knobs = state.update_knobs(changes)
    except ValueError as exc:
        return error_response("openai", ApiError(400, f"invalid knobs: {exc}", param="knobs"))
    return JSONResponse(knobs.model_dump())


async def _get_stats(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    return JSONResponse(state.stats())


async def _post_reset(request: Request) -> Response:
    state: SandboxState = request.app.state.sandbox
    state.reset()
    return JSONResponse(state.stats())


def admin_routes() -> list[BaseRoute]:
    """Knobs, stats and reset, for tests and the demo; no API key needed."""
    return [
        Route("/sandbox/knobs", _get_knobs, methods=["GET"]),
        Route("/sandbox/knobs", _post_knobs, methods=["POST"]),
        Route("/sandbox/stats", _get_stats, methods=["GET"]),
        Route("/sandbox/reset", _post_reset, methods=["POST"]),
    ]


def default_routes() -> list[BaseRoute]:
    """Every route the sandbox serves; new protocols append theirs here.

    The batch module builds its routes with :func:`provider_route`, so it is imported here, when
    the routes are built, rather than at the top where it would import this module half-done.
    """
    from routing.sandbox.batch import batch_routes
    from routing.sandbox.batch_native import native_routes

    return [*admin_routes(), *sync_routes(), *batch_routes(), *native_routes()]


class SandboxLabelMiddleware:
    """Marks every response, errors included, as coming from the sandbox."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (SANDBOX_HEADER.encode(), b"1")]
            await send(message)

        await self.app(scope, receive, send_labelled)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answered in the provider's error shape, not plain text."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    message = f"{detail}: {request.method} {request.url.path} (mixbatch sandbox)"
    return error_response(provider_of(request.url.path), ApiError(status, message))


def create_app(
    knobs: Knobs | None = None,
    *,
    state: SandboxState | None = None,
    routes: Sequence[BaseRoute] | None = None,
) -> Starlette:
    """A sandbox app serving ``routes`` (default: all of them) over one shared state."""
    if knobs is not None and state is not None:
        raise ValueError("give knobs or a state holding them, not both")
    app = Starlette(
        routes=list(default_routes() if routes is None else routes),
        middleware=[Middleware(SandboxLabelMiddleware)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.sandbox = state if state is not None else SandboxState(knobs)
    return app
