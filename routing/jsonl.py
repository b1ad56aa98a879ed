"""The OpenAI batch input format (one JSON object a line: custom_id, method, url, body).

Existing batch files work unchanged. The whole file is validated before anything is
enqueued, so a bad line leaves the lanes untouched; every error names its line.

``loads`` parses a line of a provider's results with ``orjson`` when it is installed (the
``fast`` extra; several times quicker on the collector's hot path), else with ``json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from routing.decide.tables import first_error
from routing.errors import MalformedInput
from routing.models import ENDPOINTS, Result

try:  # optional: the ``fast`` extra
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    _fast_loads = None  # type: ignore[assignment]


def loads(text: str | bytes) -> Any:
    """``json.loads``, through orjson where it is installed. A text orjson refuses and json
    takes (``NaN``, ``Infinity``) is handed to json. One difference is left: orjson reads an
    integer past 64 bits as a float (no provider's usage or body comes near one)."""
    if _fast_loads is not None:
        try:
            return _fast_loads(text)
        except ValueError:
            pass
    return json.loads(text)


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: str = "POST"
    url: str
    body: dict[str, Any]
    _line: int = PrivateAttr(default=0)

    @property
    def line(self) -> int:
        """The 1-based line of the file this came from, for error messages."""
        return self._line


def parse_batch_lines(lines: Iterable[str], source: str = "input") -> list[BatchLine]:
    """Parse and check every line; raise ``MalformedInput`` naming the first bad one."""
    out: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise MalformedInput(
                f"not JSON ({exc.msg} at column {exc.colno})", line=number, source=source
            ) from None
        if not isinstance(obj, dict):
            raise MalformedInput("each line must be a JSON object", line=number, source=source)
        try:
            line = BatchLine.model_validate(obj)
        except ValidationError as exc:
            field, message = first_error(exc)
            raise MalformedInput(f"{field}: {message}", line=number, source=source) from None
        if line.method.upper() != "POST":
            raise MalformedInput(
                f"method {line.method!r}: only POST is batched", line=number, source=source
            )
        if line.url not in ENDPOINTS:
            raise MalformedInput(
                f"url {line.url!r} is not a supported endpoint ({', '.join(sorted(ENDPOINTS))})",
                line=number,
                source=source,
            )
        if line.custom_id in seen:
            raise MalformedInput(
                f"custom_id {line.custom_id!r} repeats line {seen[line.custom_id]}",
                line=number,
                source=source,
            )
        seen[line.custom_id] = number
        line._line = number
        out.append(line)
    return out


def read_batch_file(handle: IO[str], source: str) -> list[BatchLine]:
    return parse_batch_lines(handle, source=source)


def output_line(result: Result) -> dict[str, Any]:
    """One line of the OpenAI batch output format for a finished request."""
    response = None
    if result.status_code is not None or result.body is not None:
        response = {
            "status_code": result.status_code or 200,
            "request_id": result.id,
            "body": result.body,
        }
    error = None
    if result.error is not None and result.body is None:
        error = {"code": result.error.code, "message": result.error.message}
    return {"id": result.id, "custom_id": result.custom_id, "response": response, "error": error}


def write_output(results: Iterable[Result]) -> Iterator[str]:
    for result in results:
        yield json.dumps(output_line(result), separators=(",", ":")) + "\n"
