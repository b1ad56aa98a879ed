"""Errors of the local route, placed in mixbatch's tree (routing/errors.py)::

    MixbatchError
    ├── InvalidRequest
    │   └── RequestError        one request cannot be served: carries an HTTP-like status
    │       └── UnknownModel    no local model of that name (404, lists the served ones)
    └── ConfigError             the models table, device or model files are wrong

A ``RequestError`` never escapes ``Engine.run``: it becomes that request's ``LocalAnswer`` with
``status_code`` and ``error = {"code", "message"}``, and the rest of its micro-batch goes on.
Codes follow the providers' where one exists (``context_length_exceeded``,
``model_not_found``), so a caller handles a local answer as it handles a provider's.
"""

from __future__ import annotations

from routing.errors import ConfigError, InvalidRequest

__all__ = ["ConfigError", "RequestError", "UnknownModel"]


class RequestError(InvalidRequest):
    """One request is unusable as sent (or, with status 5xx, could not be computed)."""

    def __init__(
        self, code: str, message: str, *, status_code: int = 400, field: str | None = None
    ) -> None:
        self.code = code
        self.status_code = status_code
        self.retryable = status_code >= 500
        super().__init__(message, field=field)


class UnknownModel(RequestError):
    def __init__(self, name: object, served: list[str]) -> None:
        super().__init__(
            "model_not_found",
            f"no local model {name!r} (served here: {', '.join(sorted(served)) or 'none'})",
            status_code=404,
            field="model",
        )
