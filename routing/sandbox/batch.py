"""The batch protocols of the sandbox: OpenAI Files and Batch, and Anthropic Message Batches.

Each route goes through :func:`routing.sandbox.app.provider_route` like the synchronous ones, so
keys are checked, calls counted, latency added and errors shaped per provider. The handlers only
parse and check what the real APIs check synchronously (pydantic models of the request bodies
and queries), apply the rate-limit faults of the calls that create something, and hand over to
:class:`routing.sandbox.batch_store.BatchStore`, which owns the files, batches and timelines.

Routes, in the providers' own paths::

    POST   /v1/files                        GET /v1/files[?after&limit&order&purpose]
    GET    /v1/files/{id}                   DELETE /v1/files/{id}
    GET    /v1/files/{id}/content           (streamed bytes)
    POST   /v1/batches                      GET /v1/batches[?after&limit]
    GET    /v1/batches/{id}                 POST /v1/batches/{id}/cancel
    POST   /v1/messages/batches             GET /v1/messages/batches[?before_id&after_id&limit]
    GET    /v1/messages/batches/{id}        DELETE /v1/messages/batches/{id}
    POST   /v1/messages/batches/{id}/cancel GET /v1/messages/batches/{id}/results (JSONL)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute

from routing.sandbox import answers
from routing.sandbox.app import ApiError, Call, Handler, fault_error, provider_route
from routing.sandbox.batch_openai import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    OPENAI_BATCH_ENDPOINTS,
)
from routing.sandbox.batch_records import BatchRequestError, Page
from routing.sandbox.file_store import FILE_PURPOSES, MAX_BATCH_FILE_BYTES, chunked

CUSTOM_ID_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_ANTHROPIC_REQUESTS = 100_000
MAX_ANTHROPIC_BODY_BYTES = 256 * 1024 * 1024
MIN_EXPIRES_AFTER_S = 3600
MAX_EXPIRES_AFTER_S = 2_592_000
BATCH_ANSWERED_ENDPOINTS = tuple(e for e in answers.ENDPOINTS if e != answers.MESSAGES)
"""The OpenAI batch endpoints the sandbox can answer; the rest of OpenAI's list gets a 400."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputExpiresAfter(_Strict):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S)


class OpenAIBatchCreate(_Strict):
    """The body of ``POST /v1/batches``, with OpenAI's synchronous checks."""

    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]] | None = Field(
        default=None, max_length=MAX_METADATA_PAIRS
    )
    output_expires_after: OutputExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _short_keys(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        for key in metadata or {}:
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys must be at most {MAX_METADATA_KEY_CHARS} characters")
        return metadata

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, endpoint: str) -> str:
        if endpoint not in OPENAI_BATCH_ENDPOINTS:
            raise ValueError(f"expected one of {', '.join(OPENAI_BATCH_ENDPOINTS)}")
        if endpoint not in BATCH_ANSWERED_ENDPOINTS:
            raise ValueError(f"the mixbatch sandbox does not answer batches for {endpoint}")
        return endpoint


class AnthropicBatchRequest(_Strict):
    custom_id: str = Field(min_length=1, max_length=64, pattern=CUSTOM_ID_PATTERN)
    params: dict[str, Any]


class AnthropicBatchCreate(_Strict):
    """The body of ``POST /v1/messages/batches``; ``params`` are checked later, per request."""

    requests: list[AnthropicBatchRequest] = Field(min_length=1, max_length=MAX_ANTHROPIC_REQUESTS)


class OpenAIBatchListQuery(BaseModel):
    after: str | None = None
    limit: int = Field(default=20, ge=1, le=100)


class FileListQuery(BaseModel):
    after: str | None = None
    limit: int = Field(default=10_000, ge=1, le=10_000)
    order: Literal["asc", "desc"] = "desc"
    purpose: str | None = None


class AnthropicListQuery(BaseModel):
    before_id: str | None = None
    after_id: str | None = None
    limit: int = Field(default=20, ge=1, le=1000)


def _loc(error: ErrorDetails) -> str:
    return ".".join(str(part) for part in error["loc"])


def openai_invalid(exc: ValidationError) -> ApiError:
    """The first problem of a body or query, worded as OpenAI words its 400s."""
    error = exc.errors()[0]
    param = _loc(error)
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid '{param}': {error['msg']}."
    return ApiError(400, message, param=param)


def anthropic_invalid(exc: ValidationError) -> ApiError:
    """A 400 worded as Anthropic words them: ``requests.0.custom_id: String should ...``."""
    error = exc.errors()[0]
    where = _loc(error)
    return ApiError(400, f"{where}: {error['msg']}" if where else error["msg"], param=where or None)


Parsed = TypeVar("Parsed", bound=BaseModel)


def _parsed(
    model: type[Parsed], raw: object, invalid: Callable[[ValidationError], ApiError]
) -> Parsed:
    """``raw`` as ``model``, or the provider's 400 (``invalid``) for its first problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc) from exc


def _mapped(handler: Handler) -> Handler:
    """The store's refusals as provider-shaped API errors."""

    async def handle(call: Call) -> Response | dict[str, Any]:
        try:
            return await handler(call)
        except BatchRequestError as exc:
            raise ApiError(exc.status, exc.message, param=exc.param) from exc

    return handle


async def _rate_limit(call: Call) -> None:
    """The ``batch_rate_429`` fault of calls that create something, before anything is read."""
    if call.state.choose_batch_429():
        raise fault_error("429", call.state.knobs.retry_after_s)


async def _json_object(call: Call) -> dict[str, Any]:
    raw = await call.json()
    if not isinstance(raw, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return raw


def _path_id(call: Call, name: str) -> str:
    return str(call.request.path_params[name])


def _now(call: Call) -> float:
    return call.state.clock.now()


def _base_url(call: Call) -> str:
    return str(call.request.base_url).rstrip("/")


def _openai_page(page: Page) -> dict[str, Any]:
    return {
        "object": "list",
        "data": page.items,
        "first_id": page.first_id,
        "last_id": page.last_id,
        "has_more": page.has_more,
    }


# --- OpenAI files -------------------------------------------------------------------------


def _form_text(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _expires_after_s(form: Any) -> float | None:
    anchor = _form_text(form, "expires_after[anchor]")
    seconds = _form_text(form, "expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise ApiError(
            400, "Invalid 'expires_after.anchor': expected 'created_at'.", param="expires_after"
        )
    if seconds is None or not seconds.isdigit():
        raise ApiError(
            400, "Invalid 'expires_after.seconds': expected an integer.", param="expires_after"
        )
    if not MIN_EXPIRES_AFTER_S <= int(seconds) <= MAX_EXPIRES_AFTER_S:
        raise ApiError(
            400,
            f"Invalid 'expires_after.seconds': expected {MIN_EXPIRES_AFTER_S} to "
            f"{MAX_EXPIRES_AFTER_S}.",
            param="expires_after",
        )
    return float(seconds)


async def upload_file(call: Call) -> dict[str, Any]:
    """``POST /v1/files``: only the checks OpenAI makes at upload; lines are checked later."""
    await _rate_limit(call)
    try:
        async with call.request.form() as form:
            upload = form.get("file")
            purpose = _form_text(form, "purpose")
            expires_after_s = _expires_after_s(form)
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "Missing required parameter: 'file'.", param="file")
            content = await upload.read()
            filename = upload.filename or "upload"
    except HTTPException as exc:
        raise ApiError(400, f"Invalid multipart body: {exc.detail}") from exc
    if purpose is None:
        raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
    await call.apply_faults(
        {"filename": filename, "purpose": purpose, "sha256": hashlib.sha256(content).hexdigest()}
    )
    if purpose not in FILE_PURPOSES:
        raise ApiError(
            400,
            f"Invalid 'purpose': {purpose!r}; expected one of {', '.join(FILE_PURPOSES)}.",
            param="purpose",
        )
    if purpose == "batch":
        if not filename.lower().endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
        if len(content) > MAX_BATCH_FILE_BYTES:
            raise ApiError(
                400,
                f"File is too large for Batch API: {len(content)} bytes, at most "
                f"{MAX_BATCH_FILE_BYTES}.",
                param="file",
            )
    return call.state.batches.add_file(
        _now(call),
        filename=filename,
        purpose=purpose,
        content=content,
        expires_after_s=expires_after_s,
    )


async def list_files(call: Call) -> dict[str, Any]:
    query = _parsed(FileListQuery, dict(call.request.query_params), openai_invalid)
    page = call.state.batches.list_files(
        _now(call),
        after=query.after,
        limit=query.limit,
        order=query.order,
        purpose=query.purpose,
    )
    return _openai_page(page)


async def retrieve_file(call: Call) -> dict[str, Any]:
    return call.state.batches.file_object(_now(call), _path_id(call, "file_id"))


async def delete_file(call: Call) -> dict[str, Any]:
    return call.state.batches.delete_file(_now(call), _path_id(call, "file_id"))


async def file_content(call: Call) -> Response:
    """``GET /v1/files/{id}/content``: the bytes as stored, streamed in chunks."""
    stored = call.state.batches.file_content(_now(call), _path_id(call, "file_id"))
    return StreamingResponse(chunked(stored.content), media_type="application/octet-stream")


# --- OpenAI batches -----------------------------------------------------------------------


async def create_openai_batch(call: Call) -> dict[str, Any]:
    await _rate_limit(call)
    raw = await _json_object(call)
    body = _parsed(OpenAIBatchCreate, raw, openai_invalid)
    await call.apply_faults(raw)
    expiry = body.output_expires_after
    return call.state.batches.create_openai(
        _now(call),
        call.state.knobs,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        metadata=body.metadata,
        output_expires_after_s=None if expiry is None else float(expiry.seconds),
    )


async def retrieve_openai_batch(call: Call) -> dict[str, Any]:
    return call.state.batches.batch_object("openai", _now(call), _path_id(call, "batch_id"))


async def cancel_openai_batch(call: Call) -> dict[str, Any]:
    return call.state.batches.cancel("openai", _now(call), _path_id(call, "batch_id"))


async def list_openai_batches(call: Call) -> dict[str, Any]:
    query = _parsed(OpenAIBatchListQuery, dict(call.request.query_params), openai_invalid)
    page = call.state.batches.list_batches(
        "openai", _now(call), limit=query.limit, after=query.after
    )
    return _openai_page(page)


# --- Anthropic Message Batches ------------------------------------------------------------


async def create_anthropic_batch(call: Call) -> dict[str, Any]:
    """``POST /v1/messages/batches``: the request list is checked now, each ``params`` later."""
    await _rate_limit(call)
    if len(await call.request.body()) > MAX_ANTHROPIC_BODY_BYTES:
        raise ApiError(413, f"Request exceeds the maximum size of {MAX_ANTHROPIC_BODY_BYTES} bytes")
    raw = await _json_object(call)
    body = _parsed(AnthropicBatchCreate, raw, anthropic_invalid)
    seen: set[str] = set()
    for index, request in enumerate(body.requests):
        if request.custom_id in seen:
            raise ApiError(
                400,
                f"requests.{index}.custom_id: Duplicate custom_id {request.custom_id!r}; "
                "each request in a batch needs a unique custom_id",
                param=f"requests.{index}.custom_id",
            )
        seen.add(request.custom_id)
    await call.apply_faults(raw)
    return call.state.batches.create_anthropic(
        _now(call),
        call.state.knobs,
        [(request.custom_id, request.params) for request in body.requests],
        _base_url(call),
    )


async def retrieve_anthropic_batch(call: Call) -> dict[str, Any]:
    return call.state.batches.batch_object(
        "anthropic", _now(call), _path_id(call, "batch_id"), _base_url(call)
    )


async def cancel_anthropic_batch(call: Call) -> dict[str, Any]:
    return call.state.batches.cancel(
        "anthropic", _now(call), _path_id(call, "batch_id"), _base_url(call)
    )


async def delete_anthropic_batch(call: Call) -> dict[str, Any]:
    return call.state.batches.delete_anthropic(_now(call), _path_id(call, "batch_id"))


async def anthropic_results(call: Call) -> Response:
    """``GET .../results``: one JSON line per request, in the order the requests finished."""
    content = call.state.batches.anthropic_results(_now(call), _path_id(call, "batch_id"))
    return StreamingResponse(chunked(content), media_type="application/binary")


async def list_anthropic_batches(call: Call) -> dict[str, Any]:
    query = _parsed(AnthropicListQuery, dict(call.request.query_params), anthropic_invalid)
    if query.before_id is not None and query.after_id is not None:
        raise ApiError(400, "Give before_id or after_id, not both.", param="before_id")
    page = call.state.batches.list_batches(
        "anthropic",
        _now(call),
        limit=query.limit,
        after=query.after_id,
        before=query.before_id,
        base_url=_base_url(call),
    )
    return {
        "data": page.items,
        "has_more": page.has_more,
        "first_id": page.first_id,
        "last_id": page.last_id,
    }


_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/files", upload_file),
    ("GET", "/v1/files", list_files),
    ("GET", "/v1/files/{file_id}", retrieve_file),
    ("DELETE", "/v1/files/{file_id}", delete_file),
    ("GET", "/v1/files/{file_id}/content", file_content),
    ("POST", "/v1/batches", create_openai_batch),
    ("GET", "/v1/batches", list_openai_batches),
    ("GET", "/v1/batches/{batch_id}", retrieve_openai_batch),
    ("POST", "/v1/batches/{batch_id}/cancel", cancel_openai_batch),
    ("POST", "/v1/messages/batches", create_anthropic_batch),
    ("GET", "/v1/messages/batches", list_anthropic_batches),
    ("GET", "/v1/messages/batches/{batch_id}", retrieve_anthropic_batch),
    ("DELETE", "/v1/messages/batches/{batch_id}", delete_anthropic_batch),
    ("POST", "/v1/messages/batches/{batch_id}/cancel", cancel_anthropic_batch),
    ("GET", "/v1/messages/batches/{batch_id}/results", anthropic_results),
]


def batch_routes() -> list[BaseRoute]:
    """The OpenAI Files and Batch routes and the Anthropic Message Batches routes."""
    return [
        provider_route(path, _mapped(handler), methods=(method,))
        for method, path, handler in _ROUTES
    ]
