"""Reading a batch input file for the protocols whose create call is not an OpenAI JSONL upload.

Gemini, Bedrock and Mistral take requests in their own framing (Gemini ``{key, request}``,
Bedrock ``{recordId, modelInput}``, Mistral ``{custom_id, body}``), so their adapters read the
file ``create`` is given line by line and re-frame each request. The file is either in the
OpenAI batch input format (``custom_id, method, url, body``: an existing batch file works
unchanged) or in the ``{"custom_id", "params"}`` lines ``BatchAdapter.write_input`` writes for
these protocols. Every line is checked first, so a bad one is reported with its number before
anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from routing.errors import MalformedInput, ProviderError
from routing.jsonl import parse_batch_lines
from routing.models import Endpoint
from routing.providers.batch_jobs import BatchJob

__all__ = [
    "InputLine",
    "cancel_then_read",
    "framed_requests",
    "read_input",
    "single_model",
    "without_model",
]

InputLine = tuple[int, str, dict[str, Any]]
"""(1-based line number, custom_id, request body) of one input line."""


def _as_openai(raw: str, endpoint: Endpoint) -> str:
    """A ``{"custom_id", "params"}`` line in the OpenAI format; any other line as it is."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(obj, dict) and set(obj) == {"custom_id", "params"}:
        line = {"custom_id": obj["custom_id"], "url": endpoint.value, "body": obj["params"]}
        return json.dumps(line, ensure_ascii=False)
    return raw


def read_input(path: Path, endpoint: Endpoint) -> list[InputLine]:
    """Every request of the file, checked by ``routing.jsonl`` (a repeated custom_id names both
    lines), each for ``endpoint``."""
    with path.open(encoding="utf-8") as handle:
        lines = parse_batch_lines((_as_openai(raw, endpoint) for raw in handle), path.name)
    for line in lines:
        if line.url != endpoint.value:
            raise MalformedInput(
                f"url {line.url!r}: this batch takes only {endpoint.value}",
                line=line.line,
                source=path.name,
            )
    return [(line.line, line.custom_id, line.body) for line in lines]


def single_model(path: Path, lines: list[InputLine], model: str) -> None:
    """Refuse a line naming another model: these batches run one model, named on the job."""
    for number, _, body in lines:
        given = body.get("model")
        if isinstance(given, str) and given.removeprefix("models/") != model:
            raise MalformedInput(
                f"model {given!r} differs from the batch's model {model!r}; one model per batch",
                line=number,
                source=path.name,
            )


Frame = Callable[[str, dict[str, Any]], dict[str, Any]]
SizeCheck = Callable[[Path, int, int, int, int], None]


def framed_requests(
    path: Path, endpoint: Endpoint, model: str, frame: Frame, check: SizeCheck
) -> list[dict[str, Any]]:
    """Every request of the file in the protocol's framing (``frame(custom_id, body)``), one
    model, measured as sent: ``check(path, lines, bytes, longest, its line)`` refuses a batch
    over the account's caps before anything is sent."""
    lines = read_input(path, endpoint)
    single_model(path, lines, model)
    items = [frame(cid, body) for _, cid, body in lines]
    sizes = [len(json.dumps(item, separators=(",", ":"))) for item in items]
    longest = max(sizes, default=0)
    at = lines[sizes.index(longest)][0] if lines else 0
    check(path, len(items), sum(sizes) + len(sizes), longest, at)
    return items


def without_model(body: dict[str, Any]) -> dict[str, Any]:
    """The body with its ``model`` taken out: the job names the model."""
    return {k: v for k, v in body.items() if k != "model"}


def cancel_then_read(
    batch_id: str, send: Callable[[], object], retrieve: Callable[[str], BatchJob]
) -> BatchJob:
    """Cancel by ``send`` (whose reply is not a batch), then read the batch back. A batch that
    ended first is refused by the provider (400 or 409): not an error, it is returned as it
    ended."""
    try:
        send()
    except ProviderError as exc:
        if exc.status_code not in (400, 409):
            raise
        job = retrieve(batch_id)
        if not job.terminal:
            raise
        return job
    return retrieve(batch_id)
