"""The sandbox's Mistral batch API: inline ``requests``, ``timeout_hours``, output files.

Routes, in Mistral's paths (the mistralai SDK with ``server_url`` set to the sandbox drives them
unchanged)::

    POST /v1/batch/jobs                 GET /v1/batch/jobs[?page&page_size]
    GET  /v1/batch/jobs/{id}            POST /v1/batch/jobs/{id}/cancel

Output and error files are OpenAI-shaped JSONL (``{id, custom_id, response: {status_code,
body}, error}``) kept in the sandbox's file store, so ``GET /v1/files/{id}/content`` serves them.
Answers follow the sandbox's answer contract for chat and embeddings bodies. With
``mistral_timeout`` a job ends ``TIMEOUT_EXCEEDED`` with only ``batch_expire_done_fraction`` of
its lines run; ``timeout_hours`` is checked (1 to 168).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from routing.sandbox import answers
from routing.sandbox.batch_native import NativeError, NativeJob, native_route, native_store
from routing.sandbox.state import SandboxState

__all__ = ["mistral_routes"]

MAX_TIMEOUT_HOURS = 168
_ENDPOINTS = (answers.CHAT_COMPLETIONS, answers.EMBEDDINGS)
_STATUS = {
    "pending": "QUEUED",
    "running": "RUNNING",
    "succeeded": "SUCCESS",
    "timeout": "TIMEOUT_EXCEEDED",
    "cancelled": "CANCELLED",
    "expired": "TIMEOUT_EXCEEDED",
}


def _render(error: NativeError) -> Response:
    body = {"object": "error", "message": error.message, "type": error.kind or "invalid_request"}
    return JSONResponse(body, status_code=error.status)


def _has_key(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _line(job: NativeJob, cid: str, body: dict[str, Any], fault: int | None) -> dict[str, Any]:
    if fault is not None:
        error = {"message": f"injected fault {fault}", "type": "sandbox_fault"}
        response = {"status_code": fault, "body": {"error": error}}
    else:
        response = {"status_code": 200, "body": answers.respond(job.endpoint, body)}
    return {"id": f"batchreq-{cid}", "custom_id": cid, "response": response, "error": None}


def _write_files(state: SandboxState, job: NativeJob) -> None:
    """The output (and error) file of an ended job, written once."""
    if "output_file" in job.extra:
        return
    now = state.clock.now()
    ran = job.ran(now)
    lines = [_line(job, cid, body, fault) for cid, body, fault in ran]
    good = [line for line in lines if line["response"]["status_code"] == 200]
    bad = [line for line in lines if line["response"]["status_code"] != 200]
    done = {cid for cid, *_ in ran}
    bad += [
        {"id": f"batchreq-{cid}", "custom_id": cid, "response": None, "error": _not_run(job)}
        for cid, _ in job.lines
        if cid not in done
    ]
    for name, chosen in (("output_file", good), ("error_file", bad)):
        if chosen:
            content = b"".join(json.dumps(x).encode() + b"\n" for x in chosen)
            stored = state.batches.add_file(
                now,
                filename=f"{job.job_id}-{name}.jsonl",
                purpose="batch_output",
                content=content,
                expires_after_s=None,
            )
            job.extra[name] = stored["id"]
        else:
            job.extra[name] = None


def _not_run(job: NativeJob) -> dict[str, str]:
    if job.cancelled_at is not None:
        return {"code": "batch_cancelled", "message": "the job was cancelled first"}
    return {"code": "batch_expired", "message": "the job's timeout_hours ran out first"}


def _job_object(state: SandboxState, job: NativeJob) -> dict[str, Any]:
    now = state.clock.now()
    phase = job.phase(now)
    total, ok, failed = job.counts(now)
    ended = phase not in ("pending", "running")
    if ended:
        _write_files(state, job)
    return {
        "id": job.job_id,
        "object": "batch",
        "input_files": [],
        "metadata": job.extra["metadata"],
        "endpoint": job.endpoint,
        "model": job.model,
        "agent_id": None,
        "output_file": job.extra.get("output_file"),
        "error_file": job.extra.get("error_file"),
        "errors": [],
        "status": _STATUS[phase],
        "created_at": int(job.created),
        "total_requests": total,
        "completed_requests": ok + failed,
        "succeeded_requests": ok,
        "failed_requests": failed,
        "started_at": int(job.start) if phase != "pending" else None,
        "completed_at": int(job.ended_at or now) if ended else None,
    }


async def create_job(request: Request, state: SandboxState) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NativeError(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise NativeError(400, "the body must be a JSON object")
    endpoint, model = body.get("endpoint"), body.get("model")
    if endpoint not in _ENDPOINTS:
        raise NativeError(400, f"endpoint {endpoint!r}: the sandbox answers {_ENDPOINTS}")
    if not isinstance(model, str) or not model:
        raise NativeError(400, "model is required")
    hours = body.get("timeout_hours", 24)
    if not isinstance(hours, int) or not 1 <= hours <= MAX_TIMEOUT_HOURS:
        raise NativeError(400, f"timeout_hours must be 1 to {MAX_TIMEOUT_HOURS}")
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise NativeError(400, "give requests (inline); the sandbox takes no input_files")
    if state.choose_batch_429():
        raise NativeError(429, "Rate limit exceeded (injected by the mixbatch sandbox).")
    lines: list[tuple[str, dict[str, Any]]] = []
    for number, item in enumerate(requests):
        payload = item.get("body") if isinstance(item, dict) else None
        if not isinstance(payload, dict):
            raise NativeError(400, f"requests[{number}].body must be an object")
        payload = {"model": model, **payload}
        try:
            answers.validate_body(endpoint, payload)
        except answers.InvalidBody as exc:
            raise NativeError(400, f"requests[{number}].body: {exc.message}") from exc
        lines.append((str(item.get("custom_id") or number), payload))
    knobs = state.knobs
    job = native_store(state).new_job(
        state,
        "mistral",
        model=model,
        endpoint=endpoint,
        lines=lines,
        done_fraction=knobs.batch_expire_done_fraction if knobs.mistral_timeout else 1.0,
    )
    job.extra.update(metadata=body.get("metadata") or {}, timeout_hours=hours)
    return _job_object(state, job)


async def get_job(request: Request, state: SandboxState) -> dict[str, Any]:
    return _job_object(state, native_store(state).job(request.path_params["job"], "mistral"))


async def cancel_job(request: Request, state: SandboxState) -> dict[str, Any]:
    store = native_store(state)
    job = store.job(request.path_params["job"], "mistral")
    if not store.cancel(job, state.clock.now()):
        raise NativeError(400, f"job {job.job_id} has already ended")
    return _job_object(state, job)


async def list_jobs(request: Request, state: SandboxState) -> dict[str, Any]:
    page = int(request.query_params.get("page") or 0)
    size = int(request.query_params.get("page_size") or 100)
    jobs = native_store(state).listed("mistral")
    data = [_job_object(state, j) for j in jobs[page * size : (page + 1) * size]]
    return {"object": "list", "data": data, "total": len(jobs)}


def mistral_routes() -> list[BaseRoute]:
    """Every Mistral batch route of the sandbox."""

    def route(path: str, handler: Any, methods: tuple[str, ...]) -> BaseRoute:
        return native_route(path, handler, render=_render, has_key=_has_key, methods=methods)

    return [
        route("/v1/batch/jobs", create_job, ("POST",)),
        route("/v1/batch/jobs", list_jobs, ("GET",)),
        route("/v1/batch/jobs/{job}", get_job, ("GET",)),
        route("/v1/batch/jobs/{job}/cancel", cancel_job, ("POST",)),
    ]
