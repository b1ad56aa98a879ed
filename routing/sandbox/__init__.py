"""The sandbox provider: a loopback imitation of the OpenAI and Anthropic APIs, for offline runs.

Importing this package pulls in neither starlette nor uvicorn: the answer helpers and ``Knobs``
are what producers, the demo and tests need to check answers. The server is loaded on first use
of ``SandboxServer``, ``serve`` or ``create_app``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from routing.sandbox.answers import (
    SANDBOX_FINGERPRINT,
    InvalidBody,
    answer_tag,
    embedding_for,
    estimate_tokens,
    expected_embeddings,
    expected_reply,
    last_message_text,
    reply_text,
    response_text,
    text_of,
)
from routing.sandbox.knobs import Knobs

if TYPE_CHECKING:
    from routing.sandbox.app import create_app
    from routing.sandbox.server import SandboxServer, serve

__all__ = [
    "SANDBOX_FINGERPRINT",
    "InvalidBody",
    "Knobs",
    "SandboxServer",
    "answer_tag",
    "create_app",
    "embedding_for",
    "estimate_tokens",
    "expected_embeddings",
    "expected_reply",
    "last_message_text",
    "reply_text",
    "response_text",
    "serve",
    "text_of",
]

_LAZY = {
    "SandboxServer": "routing.sandbox.server",
    "serve": "routing.sandbox.server",
    "create_app": "routing.sandbox.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
