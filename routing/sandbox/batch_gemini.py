"""The sandbox's Gemini API: generateContent, embedContent, the File API and Batch Mode.

Routes, in Gemini's own paths (the google-genai SDK with ``http_options.base_url`` set to the
sandbox drives them unchanged)::

    POST   /v1beta/models/{model}:generateContent | :embedContent
    POST   /v1beta/models/{model}:batchGenerateContent | :asyncBatchEmbedContent
    POST   /upload/v1beta/files            resumable upload: start, then upload and finalize
    GET    /v1beta/files/{id}              GET /download/v1beta/files/{id}:download?alt=media
    GET    /v1beta/files/{id}:download     (the SDK's spelling of the download)
    GET    /v1beta/batches                 GET|DELETE /v1beta/batches/{id}
    POST   /v1beta/batches/{id}:cancel

A candidate's text starts with the first 16 hex digits of the SHA-256 of the last user part's
text (the sandbox's answer contract). Batches answer inline when they were sent inline, else in a
responses file of ``{key, response | error}`` lines; with ``gemini_stuck_pending`` a batch never
starts and expires at 48 h sandbox time with no results. Creation is not idempotent.
generateContent takes ``serviceTier`` (flex, priority) and echoes the tier in
``usageMetadata.serviceTier``; flex has the OpenAI routes' knobs (``_service_tier``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from routing.decide.cost import base_model
from routing.sandbox import answers
from routing.sandbox.batch_native import (
    NativeError,
    NativeJob,
    NativeStore,
    native_route,
    native_store,
)
from routing.sandbox.state import TIMEOUT, SandboxState

__all__ = ["expected_gemini_reply", "gemini_response", "gemini_routes", "last_user_text"]

EXPIRY_S = 48 * 3600.0
INLINE_MAX_BYTES = 20_000_000
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
}
_RPC = {400: 3, 401: 16, 404: 5, 409: 6, 429: 8, 500: 13}
_GENERATE_FIELDS = frozenset(
    {
        "model",
        "contents",
        "systemInstruction",
        "system_instruction",
        "tools",
        "toolConfig",
        "tool_config",
        "safetySettings",
        "safety_settings",
        "generationConfig",
        "generation_config",
        "cachedContent",
        "cached_content",
        "serviceTier",
        "service_tier",
    }
)
_EMBED_FIELDS = frozenset(
    {
        "model",
        "content",
        "taskType",
        "task_type",
        "title",
        "outputDimensionality",
        "output_dimensionality",
    }
)


def _render(error: NativeError) -> Response:
    status = error.kind or _STATUS.get(error.status, "INTERNAL")
    body = {"error": {"code": error.status, "message": error.message, "status": status}}
    return JSONResponse(body, status_code=error.status)


def _has_key(request: Request) -> bool:
    """``x-goog-api-key`` or ``?key=``; an upload session's URL is its own credential."""
    if request.url.path.startswith("/upload/") and request.query_params.get("upload_id"):
        return True
    return bool(
        request.headers.get("x-goog-api-key", "").strip() or request.query_params.get("key")
    )


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def last_user_text(body: Mapping[str, Any]) -> str:
    """The text of the last part of the last user turn (a turn with no role is the user's)."""
    contents = body.get("contents")
    if isinstance(contents, str):
        return contents
    turns = [c for c in contents or [] if isinstance(c, Mapping)]
    users = [c for c in turns if c.get("role", "user") == "user"]
    parts = [p for p in (users[-1].get("parts") or []) if isinstance(p, Mapping)] if users else []
    texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
    return texts[-1] if texts else ""


def expected_gemini_reply(body: Mapping[str, Any], model: str) -> str:
    """The text the sandbox answers a GenerateContentRequest with, to check a join."""
    return answers.reply_text(last_user_text(body), model.removeprefix("models/"))


def _embed_text(body: Mapping[str, Any]) -> str:
    content = body.get("content")
    parts = content.get("parts") if isinstance(content, Mapping) else None
    return "\n".join(
        p["text"] for p in parts or [] if isinstance(p, Mapping) and isinstance(p.get("text"), str)
    )


def _check(verb: str, body: object) -> dict[str, Any]:
    """A 400 for what Gemini would refuse: not an object, unknown fields, no contents."""
    if not isinstance(body, dict):
        raise NativeError(400, "Invalid JSON payload received: the request must be an object")
    known = _GENERATE_FIELDS if verb == "generateContent" else _EMBED_FIELDS
    unknown = sorted(set(body) - known)
    if unknown:
        raise NativeError(
            400,
            f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.',
        )
    if verb == "generateContent" and not body.get("contents"):
        raise NativeError(400, "* GenerateContentRequest.contents: contents is not specified")
    if verb == "embedContent" and not isinstance(body.get("content"), Mapping):
        raise NativeError(400, "* EmbedContentRequest.content: content is not specified")
    return body


def gemini_response(verb: str, body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A GenerateContentResponse (or EmbedContentResponse) answering ``body``."""
    bare = model.removeprefix("models/")
    if verb == "embedContent":
        dims = body.get("outputDimensionality") or body.get("output_dimensionality")
        size = dims if isinstance(dims, int) and 0 < dims <= answers.MAX_DIMENSIONS else 8
        return {"embedding": {"values": answers.embedding_for(_embed_text(body), size)}}
    text = expected_gemini_reply(body, bare)
    prompt = answers.estimate_tokens(last_user_text(body))
    out = answers.estimate_tokens(text)
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": out,
            "totalTokenCount": prompt + out,
        },
        "modelVersion": bare,
    }


def _line_answer(job: NativeJob, cid: str, body: dict[str, Any], fault: int | None) -> dict:
    verb = job.extra["verb"]
    if fault is not None:
        code = _RPC.get(fault, 13)
        error = {"code": code, "message": f"injected fault {fault}", "status": _STATUS[fault]}
        return {"error": error, "metadata": {"key": cid}}
    return {"response": gemini_response(verb, body, job.model), "metadata": {"key": cid}}


def _file_object(store: NativeStore, name: str) -> dict[str, Any]:
    record = store.files.get(name)
    if record is None:
        raise NativeError(404, f"File {name} not found", "NOT_FOUND")
    return {k: v for k, v in record.items() if k != "content"}


def _new_file(
    store: NativeStore, state: SandboxState, base: str, content: bytes, display: str, source: str
) -> dict[str, Any]:
    name = "files/" + store.next_id("file")
    now = _iso(state.clock.now())
    record = {
        "name": name,
        "displayName": display,
        "mimeType": "application/jsonl",
        "sizeBytes": str(len(content)),
        "createTime": now,
        "updateTime": now,
        "state": "ACTIVE",
        "source": source,
        "uri": f"{base}/v1beta/{name}",
        "downloadUri": f"{base}/download/v1beta/{name}:download?alt=media",
        "content": content,
    }
    store.files[name] = record
    return record


def _batch_object(
    store: NativeStore, state: SandboxState, job: NativeJob, base: str
) -> dict[str, Any]:
    now = state.clock.now()
    phase = job.phase(now)
    total, ok, failed = job.counts(now)
    state_name = "BATCH_STATE_" + {"timeout": "SUCCEEDED"}.get(phase, phase.upper())
    meta: dict[str, Any] = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "name": f"batches/{job.job_id}",
        "model": f"models/{job.model}",
        "displayName": job.extra["display"],
        "inputConfig": job.extra["input"],
        "createTime": _iso(job.created),
        "updateTime": _iso(now),
        "state": state_name,
        "batchStats": {
            "requestCount": str(total),
            "successfulRequestCount": str(ok),
            "failedRequestCount": str(failed),
            "pendingRequestCount": str(total - ok - failed),
        },
    }
    done = phase not in ("pending", "running")
    if done:
        meta["endTime"] = _iso(job.ended_at)
    if phase == "succeeded":
        meta["output"] = _output(store, state, job, base)
    reply: dict[str, Any] = {"name": f"batches/{job.job_id}", "metadata": meta, "done": done}
    if "output" in meta:
        reply["response"] = {"@type": meta["@type"], **meta["output"]}
    return reply


def _output(store: NativeStore, state: SandboxState, job: NativeJob, base: str) -> dict:
    """Inline responses for an inline batch, else a responses file (written once)."""
    lines = [_line_answer(job, cid, body, fault) for cid, body, fault in job.ran(job.end)]
    if "requests" in job.extra["input"]:
        return {"inlinedResponses": {"inlinedResponses": lines}}
    if "file" not in job.extra:
        content = b"".join(
            json.dumps({"key": item.pop("metadata")["key"], **item}).encode() + b"\n"
            for item in lines
        )
        record = _new_file(store, state, base, content, f"{job.job_id}-responses", "GENERATED")
        job.extra["file"] = record["name"]
    return {"responsesFile": job.extra["file"]}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NativeError(400, f"Invalid JSON payload received. {exc}") from exc


async def models_call(request: Request, state: SandboxState) -> Response | dict[str, Any]:
    """``models/{model}:verb`` for the four verbs."""
    model, _, verb = request.path_params["name"].partition(":")
    body = await _json(request)
    if verb in ("generateContent", "embedContent"):
        kind = state.choose_fault(f"gemini:{verb}", body, request.headers)
        if kind == TIMEOUT:
            await state.pause(state.knobs.hang_s)
        elif kind is not None:
            raise NativeError(int(kind), f"injected fault {kind} (mixbatch sandbox)")
        answer = gemini_response(verb, _check(verb, body), model)
        if verb == "generateContent":
            answer["usageMetadata"]["serviceTier"] = await _service_tier(state, body, model)
        return answer
    if verb in ("batchGenerateContent", "asyncBatchEmbedContent"):
        return _create_batch(request, state, model, verb, body)
    raise NativeError(404, f"models/{model}:{verb} is not a method the sandbox serves")


async def _service_tier(state: SandboxState, body: Mapping[str, Any], model: str) -> str:
    """The tier a generateContent call is served at, echoed in ``usageMetadata.serviceTier``
    (the sandbox's choice: google-genai's output-only field; the live API's echo is unconfirmed).

    Flex, as on the OpenAI routes, is slower (``flex_latency_ms``), sheds load and is refused
    with a 400 for a model outside ``flex_models``. A shed Gemini call is a 429
    ``RESOURCE_EXHAUSTED`` whichever knob drew it (``flex_rate_429``, or Groq's ``flex_rate_498``).
    """
    raw = body.get("serviceTier", body.get("service_tier")) or "standard"
    asked = str(raw).lower().removeprefix("service_tier_")
    if asked == "unspecified":
        asked = "standard"
    if asked not in ("standard", "flex", "priority"):
        raise NativeError(400, f"Invalid value at 'service_tier': \"{raw}\"", "INVALID_ARGUMENT")
    if asked != "flex":
        return asked
    knobs, bare = state.knobs, model.removeprefix("models/")
    if bare not in knobs.flex_models and base_model(bare) not in knobs.flex_models:
        raise NativeError(400, f"Flex inference is not available for model {bare!r}.")
    await state.pause(knobs.flex_latency_ms / 1000)
    if state.choose_flex_shed() is not None:
        raise NativeError(
            429, "Resource has been exhausted: flex capacity is short (mixbatch sandbox)."
        )
    return "flex"


def _create_batch(
    request: Request, state: SandboxState, model: str, verb: str, body: object
) -> dict[str, Any]:
    store = native_store(state)
    batch = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch, dict):
        raise NativeError(400, "* batch: batch is not specified")
    if state.choose_batch_429():
        raise NativeError(429, "Resource has been exhausted (injected by the mixbatch sandbox).")
    config = batch.get("inputConfig") or batch.get("input_config") or {}
    line_verb = "generateContent" if verb == "batchGenerateContent" else "embedContent"
    lines: list[tuple[str, dict[str, Any]]] = []
    file_name = config.get("fileName") or config.get("file_name")
    if isinstance(file_name, str):
        raw = store.files.get(file_name, {}).get("content")
        if raw is None:
            raise NativeError(400, f"file {file_name} not found")
        for number, text in enumerate(raw.decode().splitlines(), start=1):
            if text.strip():
                item = json.loads(text)
                lines.append((str(item.get("key") or number), _check(line_verb, item["request"])))
        source: dict[str, Any] = {"fileName": file_name}
    else:
        requests = (config.get("requests") or {}).get("requests")
        if not isinstance(requests, list) or not requests:
            raise NativeError(400, "* batch.input_config: requests or file_name is required")
        if len(json.dumps(requests)) > INLINE_MAX_BYTES:
            raise NativeError(400, "inline requests are over 20 MB; upload a file instead")
        for number, item in enumerate(requests, start=1):
            key = ((item.get("metadata") or {}).get("key")) or str(number)
            lines.append((str(key), _check(line_verb, item.get("request"))))
        source = {"requests": {"requests": requests}}
    knobs = state.knobs
    job = store.new_job(
        state,
        "gemini",
        model=model.removeprefix("models/"),
        endpoint=line_verb,
        lines=lines,
        never_starts=knobs.gemini_stuck_pending,
        expire_after_s=EXPIRY_S,
    )
    job.extra.update(
        verb=line_verb,
        display=str(batch.get("displayName") or batch.get("display_name") or ""),
        input=source,
    )
    return _batch_object(store, state, job, _base(request))


async def batch_call(request: Request, state: SandboxState) -> Response | dict[str, Any]:
    """GET, DELETE or ``:cancel`` one batch."""
    store = native_store(state)
    name, _, verb = request.path_params["name"].partition(":")
    job = store.job(name, "gemini")
    if request.method == "DELETE":
        with store.lock:
            store.jobs.pop(job.job_id, None)
        return {}
    if verb == "cancel":
        if not store.cancel(job, state.clock.now()):
            raise NativeError(400, f"batches/{name} has already ended", "FAILED_PRECONDITION")
        return {}
    return _batch_object(store, state, job, _base(request))


async def list_batches(request: Request, state: SandboxState) -> dict[str, Any]:
    store = native_store(state)
    size = int(request.query_params.get("pageSize") or 50)
    start = int(request.query_params.get("pageToken") or 0)
    jobs = store.listed("gemini")
    page = [_batch_object(store, state, j, _base(request)) for j in jobs[start : start + size]]
    more = start + size < len(jobs)
    return {"operations": page, **({"nextPageToken": str(start + size)} if more else {})}


async def upload(request: Request, state: SandboxState) -> Response:
    """The resumable protocol: ``start`` answers an upload URL; chunks are appended there."""
    store = native_store(state)
    command = request.headers.get("x-goog-upload-command", "").lower()
    upload_id = request.query_params.get("upload_id")
    if upload_id is None:
        if "start" not in command:
            raise NativeError(400, "x-goog-upload-command: start is required first")
        meta = await _json(request)
        upload_id = store.next_id("up")
        store.files[f"uploads/{upload_id}"] = {"content": b"", "file": meta.get("file") or {}}
        url = f"{_base(request)}/upload/v1beta/files?upload_id={upload_id}"
        return JSONResponse(
            {}, headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"}
        )
    pending = store.files.get(f"uploads/{upload_id}")
    if pending is None:
        raise NativeError(404, f"upload {upload_id} not found")
    offset = int(request.headers.get("x-goog-upload-offset") or 0)
    if offset != len(pending["content"]):
        raise NativeError(400, f"offset {offset} is not {len(pending['content'])}")
    pending["content"] += await request.body()
    if "finalize" not in command:
        return JSONResponse({}, headers={"x-goog-upload-status": "active"})
    store.files.pop(f"uploads/{upload_id}")
    display = str(pending["file"].get("displayName") or pending["file"].get("display_name") or "")
    record = _new_file(store, state, _base(request), pending["content"], display, "UPLOADED")
    body = {"file": _file_object(store, record["name"])}
    return JSONResponse(body, headers={"x-goog-upload-status": "final"})


async def get_file(request: Request, state: SandboxState) -> Response | dict[str, Any]:
    """A file's object, or its bytes for ``{name}:download`` (the SDK's spelling)."""
    if request.path_params["name"].endswith(":download"):
        return await download(request, state)
    return _file_object(native_store(state), "files/" + request.path_params["name"])


async def download(request: Request, state: SandboxState) -> Response:
    name = request.path_params["name"].removesuffix(":download")
    record = native_store(state).files.get(f"files/{name}")
    if record is None:
        raise NativeError(404, f"File files/{name} not found", "NOT_FOUND")
    return Response(record["content"], media_type="application/octet-stream")


def gemini_routes() -> list[BaseRoute]:
    """Every Gemini route of the sandbox."""

    def route(path: str, handler: Any, methods: tuple[str, ...] = ("POST",)) -> BaseRoute:
        return native_route(path, handler, render=_render, has_key=_has_key, methods=methods)

    return [
        route("/v1beta/models/{name}", models_call),
        route("/upload/v1beta/files", upload),
        route("/v1beta/files/{name}", get_file, ("GET",)),
        route("/download/v1beta/files/{name}", download, ("GET",)),
        route("/v1beta/batches", list_batches, ("GET",)),
        route("/v1beta/batches/{name}", batch_call, ("GET", "POST", "DELETE")),
    ]
