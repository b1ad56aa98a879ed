"""The sandbox's Bedrock batch inference, and the small S3 subset its jobs read and write.

boto3 drives both unchanged: ``boto3.client("bedrock", endpoint_url=<sandbox>/bedrock)`` and
``boto3.client("s3", endpoint_url=<sandbox>/s3)`` with path-style addressing. Any signature is
accepted (the header must be there). Routes::

    POST /bedrock/model-invocation-job                CreateModelInvocationJob
    GET  /bedrock/model-invocation-job/{arn or id}    GetModelInvocationJob
    POST /bedrock/model-invocation-job/{id}/stop      StopModelInvocationJob
    GET  /bedrock/model-invocation-jobs               ListModelInvocationJobs
    PUT|GET|HEAD|DELETE /s3/{bucket}/{key}            objects;  PUT /s3/{bucket}: a bucket
    GET  /s3/{bucket}?list-type=2&prefix=             ListObjectsV2

A job reads ``{recordId, modelInput}`` lines from its input object (Anthropic Messages bodies),
and when it ends writes ``{output prefix}{job id}/{input name}.out`` (``{recordId, modelInput,
modelOutput | error}``) and ``manifest.json.out``. ``clientRequestToken`` makes a create
idempotent. Fewer records than ``bedrock_min_records`` is a ``ValidationException``; with
``bedrock_expire`` a job stays ``Scheduled`` and ends ``Expired`` at ``timeoutDurationInHours``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from routing.sandbox import answers
from routing.sandbox.batch_native import (
    NativeError,
    NativeJob,
    NativeStore,
    native_route,
    native_store,
)
from routing.sandbox.state import SandboxState

__all__ = ["bedrock_routes", "s3_routes"]

ACCOUNT = "123456789012"
REGION = "us-east-1"
_STATUS = {
    "pending": "Scheduled",
    "running": "InProgress",
    "succeeded": "Completed",
    "timeout": "PartiallyCompleted",
    "cancelled": "Stopped",
    "expired": "Expired",
}
_ERROR_TYPES = {400: "ValidationException", 404: "ResourceNotFoundException"}
_ERROR_TYPES |= {409: "ConflictException", 429: "ThrottlingException", 401: "AccessDenied"}


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _render(error: NativeError) -> Response:
    kind = error.kind or _ERROR_TYPES.get(error.status, "InternalServerException")
    return JSONResponse(
        {"message": error.message}, status_code=error.status, headers={"x-amzn-ErrorType": kind}
    )


def _render_s3(error: NativeError) -> Response:
    kind = error.kind or ("NoSuchKey" if error.status == 404 else "InvalidRequest")
    xml = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{kind}</Code>"
        f"<Message>{escape(error.message)}</Message></Error>"
    )
    return Response(xml, status_code=error.status, media_type="application/xml")


def _has_signature(request: Request) -> bool:
    return bool(request.headers.get("authorization", "").strip())


def _s3_uri(uri: object) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise NativeError(400, f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _arn(job_id: str) -> str:
    return f"arn:aws:bedrock:{REGION}:{ACCOUNT}:model-invocation-job/{job_id}"


def _record_line(job: NativeJob, cid: str, body: dict[str, Any], fault: int | None) -> bytes:
    model_input = {k: v for k, v in body.items() if k != "model"}
    line: dict[str, Any] = {"recordId": cid, "modelInput": model_input}
    if fault is not None:
        code = "ValidationException" if fault == 400 else "InternalServerException"
        line["error"] = {"errorCode": code, "errorMessage": f"injected fault {fault}"}
    else:
        line["modelOutput"] = answers.anthropic_message({**body, "model": job.model})
    return json.dumps(line).encode() + b"\n"


def _write_outputs(store: NativeStore, job: NativeJob, now: float) -> None:
    """The ``.jsonl.out`` and manifest of an ended job, written once."""
    if job.extra.get("written") or job.phase(now) in ("pending", "running"):
        return
    bucket, prefix = job.extra["output"]
    name = job.extra["input"][1].rsplit("/", 1)[-1]
    ran = job.ran(now)
    lines = b"".join(_record_line(job, cid, body, fault) for cid, body, fault in ran)
    total, ok, failed = job.counts(now)
    manifest = {
        "totalRecordCount": total,
        "processedRecordCount": ok + failed,
        "successRecordCount": ok,
        "errorRecordCount": failed,
    }
    with store.lock:
        if ran:
            store.objects[(bucket, f"{prefix}{job.job_id}/{name}.out")] = lines
            manifest_key = f"{prefix}{job.job_id}/manifest.json.out"
            store.objects[(bucket, manifest_key)] = json.dumps(manifest).encode()
        job.extra["written"] = True


def _job_object(store: NativeStore, state: SandboxState, job: NativeJob) -> dict[str, Any]:
    now = state.clock.now()
    _write_outputs(store, job, now)
    phase = job.phase(now)
    in_bucket, in_key = job.extra["input"]
    out_bucket, out_prefix = job.extra["output"]
    reply = {
        "jobArn": _arn(job.job_id),
        "jobName": job.extra["name"],
        "modelId": job.model,
        "clientRequestToken": job.extra["token"],
        "roleArn": job.extra["role"],
        "status": _STATUS[phase],
        "submitTime": _iso(job.created),
        "lastModifiedTime": _iso(now),
        "inputDataConfig": {
            "s3InputDataConfig": {"s3Uri": f"s3://{in_bucket}/{in_key}", "s3InputFormat": "JSONL"}
        },
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"s3://{out_bucket}/{out_prefix}"}},
        "timeoutDurationInHours": job.extra["hours"],
        "jobExpirationTime": _iso(job.created + job.extra["hours"] * 3600.0),
    }
    if phase not in ("pending", "running"):
        reply["endTime"] = _iso(job.ended_at)
    if phase == "expired":
        reply["message"] = "the job was not started before its timeout"
    return reply


async def create_job(request: Request, state: SandboxState) -> dict[str, Any]:
    store = native_store(state)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NativeError(400, f"the body is not JSON: {exc}") from exc
    for name in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
        if not body.get(name):
            raise NativeError(400, f"1 validation error detected: {name} must not be null")
    token = str(body.get("clientRequestToken") or "")
    with store.lock:
        known = store.tokens.get(token) if token else None
    if known is not None:
        return {"jobArn": _arn(known)}
    if state.choose_batch_429():
        raise NativeError(429, "Too many requests (injected by the mixbatch sandbox).")
    source = _s3_uri(body["inputDataConfig"].get("s3InputDataConfig", {}).get("s3Uri"))
    output = _s3_uri(body["outputDataConfig"].get("s3OutputDataConfig", {}).get("s3Uri"))
    with store.lock:
        raw = store.objects.get(source)
    if raw is None:
        raise NativeError(400, f"no input object at s3://{source[0]}/{source[1]}")
    lines: list[tuple[str, dict[str, Any]]] = []
    for number, text in enumerate(raw.decode().splitlines(), start=1):
        if not text.strip():
            continue
        record = json.loads(text)
        model_input = record.get("modelInput")
        if not isinstance(record.get("recordId"), str) or not isinstance(model_input, dict):
            raise NativeError(400, f"line {number}: records need recordId and modelInput")
        lines.append((record["recordId"], {"model": body["modelId"], **model_input}))
    knobs = state.knobs
    if len(lines) < knobs.bedrock_min_records:
        raise NativeError(
            400,
            f"the job has {len(lines)} records, below the minimum of "
            f"{knobs.bedrock_min_records} for {body['modelId']}",
        )
    hours = int(body.get("timeoutDurationInHours") or 24)
    job = store.new_job(
        state,
        "bedrock",
        model=body["modelId"],
        endpoint=answers.MESSAGES,
        lines=lines,
        never_starts=knobs.bedrock_expire,
        expire_after_s=hours * 3600.0,
    )
    job.extra.update(
        name=body["jobName"],
        token=token,
        role=body["roleArn"],
        input=source,
        output=output,
        hours=hours,
    )
    if token:
        with store.lock:
            store.tokens[token] = job.job_id
    return {"jobArn": _arn(job.job_id)}


def _job_of(request: Request, state: SandboxState) -> NativeJob:
    ident = request.path_params["job"].rsplit("/", 1)[-1]
    return native_store(state).job(ident, "bedrock")


async def get_job(request: Request, state: SandboxState) -> dict[str, Any]:
    return _job_object(native_store(state), state, _job_of(request, state))


async def stop_job(request: Request, state: SandboxState) -> dict[str, Any]:
    job = _job_of(request, state)
    if not native_store(state).cancel(job, state.clock.now()):
        raise NativeError(400, f"job {job.job_id} has already ended")
    return {}


async def list_jobs(request: Request, state: SandboxState) -> dict[str, Any]:
    store = native_store(state)
    size = int(request.query_params.get("maxResults") or 100)
    start = int(request.query_params.get("nextToken") or 0)
    jobs = store.listed("bedrock")
    page = [_job_object(store, state, j) for j in jobs[start : start + size]]
    more = start + size < len(jobs)
    return {"invocationJobSummaries": page, **({"nextToken": str(start + size)} if more else {})}


async def s3_object(request: Request, state: SandboxState) -> Response:
    store = native_store(state)
    for job in store.listed("bedrock"):
        _write_outputs(store, job, state.clock.now())
    where = (request.path_params["bucket"], request.path_params["key"])
    if request.method == "PUT":
        content = await request.body()
        with store.lock:
            store.objects[where] = content
        return Response(status_code=200, headers={"ETag": f'"{len(content):x}"'})
    if request.method == "DELETE":
        with store.lock:
            store.objects.pop(where, None)
        return Response(status_code=204)
    with store.lock:
        stored = store.objects.get(where)
    if stored is None:
        raise NativeError(404, f"The specified key does not exist: {where[1]}")
    headers = {"Content-Length": str(len(stored)), "ETag": f'"{len(stored):x}"'}
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers)
    return Response(stored, media_type="application/octet-stream", headers=headers)


async def s3_bucket(request: Request, state: SandboxState) -> Response:
    """PUT makes a bucket (nothing to do); GET lists its objects (ListObjectsV2, one page)."""
    if request.method == "PUT":
        return Response(status_code=200)
    store = native_store(state)
    for job in store.listed("bedrock"):
        _write_outputs(store, job, state.clock.now())
    bucket = request.path_params["bucket"]
    prefix = request.query_params.get("prefix", "")
    with store.lock:
        keys = sorted((k, len(v)) for (b, k), v in store.objects.items() if b == bucket)
    found = [(k, n) for k, n in keys if k.startswith(prefix)]
    contents = "".join(
        f"<Contents><Key>{escape(k)}</Key><Size>{n}</Size>"
        f'<LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>"{n:x}"</ETag>'
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for k, n in found
    )
    xml = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
        f"<KeyCount>{len(found)}</KeyCount><MaxKeys>1000</MaxKeys>"
        f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
    )
    return Response(xml, media_type="application/xml")


def bedrock_routes() -> list[BaseRoute]:
    """The Bedrock control plane of the sandbox."""

    def route(path: str, handler: Any, methods: tuple[str, ...]) -> BaseRoute:
        return native_route(path, handler, render=_render, has_key=_has_signature, methods=methods)

    return [
        route("/bedrock/model-invocation-job", create_job, ("POST",)),
        route("/bedrock/model-invocation-jobs", list_jobs, ("GET",)),
        route("/bedrock/model-invocation-job/{job:path}/stop", stop_job, ("POST",)),
        route("/bedrock/model-invocation-job/{job:path}", get_job, ("GET",)),
    ]


def s3_routes() -> list[BaseRoute]:
    """The S3 subset: objects and ListObjectsV2, path-style, under ``/s3``."""

    def route(path: str, handler: Any, methods: tuple[str, ...]) -> BaseRoute:
        return native_route(
            path, handler, render=_render_s3, has_key=_has_signature, methods=methods
        )

    return [
        route("/s3/{bucket}/{key:path}", s3_object, ("PUT", "GET", "HEAD", "DELETE")),
        route("/s3/{bucket}", s3_bucket, ("PUT", "GET")),
    ]
