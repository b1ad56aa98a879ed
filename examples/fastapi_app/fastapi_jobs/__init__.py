"""The example FastAPI app: submit a job to mixbatch, then await its answer; or ask and wait.

    cd examples/fastapi_app && uvicorn fastapi_jobs:app
                                  # beside a running service (`mixbatch up`): the same
                                  # MIXBATCH_REDIS_URL and MIXBATCH_NAMESPACE (default "mb")

POST   /jobs            {"text": "...", "task": "summarise" | "embed", "lane": "standard"}
                        -> 202 {"id", "lane", "deadline", "duplicate"}; submitted with AsyncClient
GET    /jobs/{id}?wait=30
                        -> 200 {"id", "status", "route", "answer"} once it has finished (waits up
                           to ``wait`` seconds for it: BLPOP, not polling, and no thread held);
                           202 {"id", "status"} if it is still running then
DELETE /jobs/{id}       -> {"id", "status"}: cancelled, or the outcome it already had
POST   /ask             {"question": "...", "lane": "urgent"} -> {"answer", "request_id"}:
                        the OpenAI SDK's call, unchanged but for its import (``routing.dropin``)

One ``AsyncClient`` per app, built in the lifespan (its connections belong to the event loop
that serves the app); a bad request is a 400 naming the field, a full lane a 429.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import openai
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from routing.client import AsyncClient, InvalidRequest, LaneFull, NotFound, StoreUnavailable
from routing.dropin import AsyncOpenAI

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
MAX_WAIT_S = 60.0


def summarise(text: str) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "Summarise the text in one sentence."},
        {"role": "user", "content": text},
    ]
    return {"endpoint": "/v1/chat/completions", "body": {"model": CHAT_MODEL, "messages": messages}}


def embed(text: str) -> dict[str, Any]:
    return {"endpoint": "/v1/embeddings", "body": {"model": EMBEDDING_MODEL, "input": text}}


TASKS = {"summarise": summarise, "embed": embed}


class Job(BaseModel):
    text: str = Field(min_length=1)
    task: str = "summarise"
    lane: str = "standard"
    custom_id: str | None = None


class Question(BaseModel):
    question: str = Field(min_length=1)
    lane: str = "urgent"


def answer_of(body: dict[str, Any] | None) -> Any:
    """The part of a provider's answer a caller wants: the reply text or the vector."""
    if not body:
        return None
    if "choices" in body:
        return body["choices"][0]["message"]["content"]
    return body["data"][0]["embedding"]


def create_app(redis_url: str | None = None, namespace: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncClient(redis_url, namespace=namespace) as mixbatch:
            app.state.mixbatch = mixbatch
            app.state.llm = AsyncOpenAI(lane="urgent", client=mixbatch)
            yield

    app = FastAPI(title="mixbatch jobs", lifespan=lifespan)

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)

    @app.exception_handler(LaneFull)
    async def full(request: Request, exc: LaneFull) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=429)

    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.post("/jobs", status_code=202)
    async def submit(job: Job, request: Request) -> dict[str, Any]:
        if job.task not in TASKS:
            raise HTTPException(400, f"task: one of {sorted(TASKS)}")
        mixbatch: AsyncClient = request.app.state.mixbatch
        ticket = await mixbatch.submit(
            **TASKS[job.task](job.text), lane=job.lane, custom_id=job.custom_id
        )
        return ticket.model_dump(include={"id", "lane", "deadline", "duplicate"})

    @app.get("/jobs/{job_id}")
    async def result(
        job_id: str, request: Request, wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0
    ) -> JSONResponse:
        mixbatch: AsyncClient = request.app.state.mixbatch
        try:
            done = await mixbatch.result(job_id, timeout=wait)
        except TimeoutError:  # ResultTimeout: still queued or running
            status = await mixbatch.status(job_id)
            return JSONResponse({"id": job_id, "status": status.state}, status_code=202)
        error = done.error.model_dump() if done.error else None
        return JSONResponse(
            {
                "id": job_id,
                "status": done.status,
                "route": done.route,
                "answer": answer_of(done.body) if done.ok else None,
                "error": error,
            }
        )

    @app.delete("/jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict[str, Any]:
        return {"id": job_id, "status": await request.app.state.mixbatch.cancel(job_id)}

    @app.post("/ask")
    async def ask(question: Question, request: Request) -> dict[str, Any]:
        llm: AsyncOpenAI = request.app.state.llm
        try:
            completion = await llm.chat.completions.create(
                model=CHAT_MODEL,
                messages=[{"role": "user", "content": question.question}],
                extra_body={"mixbatch": {"lane": question.lane}},
                timeout=MAX_WAIT_S,
            )
        except openai.APIStatusError as exc:  # the SDK's own errors, as from OpenAI itself
            raise HTTPException(exc.status_code, exc.message) from exc
        except openai.APITimeoutError as exc:
            raise HTTPException(504, "no answer in time; ask again") from exc
        return {
            "answer": completion.choices[0].message.content,
            "request_id": completion._request_id,
        }

    return app


app = create_app()
