"""Deterministic sandbox answers, as pure functions importable without the HTTP stack.

Every answer is derived from the request it answers: a chat reply starts with a hash of the
request's last message, an embedding is seeded by its input. A result joined to the wrong request
is therefore detectable, by the tests and by the service's demo, with the same functions the
sandbox server uses. The response builders are shared with the batch protocols, whose output
files carry the same bodies as the synchronous endpoints.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

SANDBOX_FINGERPRINT = "mixbatch-sandbox"
DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 8192

CHAT_COMPLETIONS = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"
TEXT_ENDPOINTS = (CHAT_COMPLETIONS, RESPONSES, MESSAGES)
ENDPOINTS = (*TEXT_ENDPOINTS, EMBEDDINGS)

_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})

EmbeddingInput = str | list[int]


class InvalidBody(ValueError):
    """A request body the real provider would refuse with a 400; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


def text_of(content: object) -> str:
    """The text of a message's content, whether a plain string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") in _TEXT_PART_TYPES
            and isinstance(part.get("text"), str)
        )
    return ""


def _item_text(item: object) -> str:
    """Text of one Responses input item: a message, a bare content part or a tool output."""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        return ""
    if "content" in item:
        return text_of(item["content"])
    if "output" in item:
        return text_of(item["output"])
    return text_of([item])


def last_message_text(endpoint: str, body: Mapping[str, Any]) -> str:
    """Text of the message a reply answers: the last one of the conversation."""
    if endpoint in (CHAT_COMPLETIONS, MESSAGES):
        messages = body.get("messages") or []
        last = messages[-1] if messages else None
        return text_of(last.get("content")) if isinstance(last, Mapping) else ""
    if endpoint == RESPONSES:
        given = body.get("input")
        if isinstance(given, str):
            return given
        return _item_text(given[-1]) if isinstance(given, list) and given else ""
    raise ValueError(f"no last message for endpoint {endpoint!r}")


def answer_tag(text: str) -> str:
    """A short fingerprint of the text a reply answers, the first thing in every reply."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def reply_text(last: str, model: str) -> str:
    """The sandbox's whole reply to a conversation whose last message is ``last``."""
    return f"{answer_tag(last)} sandbox reply from {model}"


def expected_reply(endpoint: str, body: Mapping[str, Any]) -> str:
    """The reply text the sandbox gives to ``body``, to check an answer was joined right."""
    return reply_text(last_message_text(endpoint, body), str(body.get("model", "")))


def estimate_tokens(text: str) -> int:
    """A token count good enough for usage fields, without a tokenizer."""
    return len(text) // 4 + 1


def embedding_for(item: str | Sequence[int], dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """A unit vector seeded by the input, exact in float32 so base64 and float answers agree."""
    source = item if isinstance(item, str) else json.dumps(list(item))
    seed = int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest(), "big")
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(x * x for x in vector)) or 1.0
    return array.array("f", (x / norm for x in vector)).tolist()


def encode_base64(vector: Sequence[float]) -> str:
    """An embedding as OpenAI sends it for ``encoding_format: "base64"``: little-endian float32."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_base64(data: str) -> list[float]:
    """The inverse of :func:`encode_base64`, for clients that ask for base64 themselves."""
    packed = array.array("f", base64.b64decode(data))
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def embedding_inputs(given: object) -> list[EmbeddingInput]:
    """The separate inputs of an embeddings request, each of which gets one vector."""
    if isinstance(given, str):
        if not given:
            raise InvalidBody("input", "Invalid 'input': must not be an empty string.")
        return [given]
    if isinstance(given, list) and given:
        if all(isinstance(x, str) and x for x in given):
            return list(given)
        if _is_token_array(given):
            return [list(given)]
        if all(_is_token_array(x) for x in given):
            return [list(x) for x in given]
    if given is None:
        raise InvalidBody("input", "Missing required parameter: 'input'.")
    raise InvalidBody(
        "input",
        "Invalid 'input': expected a non-empty string, an array of non-empty strings, "
        "an array of tokens or an array of token arrays.",
    )


def _required(body: Mapping[str, Any], name: str) -> Any:
    """``body[name]``, refused as OpenAI refuses a missing parameter when it is absent."""
    value = body.get(name)
    if value is None:
        raise InvalidBody(name, f"Missing required parameter: '{name}'.")
    return value


def _require_model(body: Mapping[str, Any]) -> None:
    model = _required(body, "model")
    if not isinstance(model, str) or not model:
        raise InvalidBody("model", "Invalid 'model': expected a non-empty string.")


def _require_messages(body: Mapping[str, Any]) -> None:
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidBody("messages", "Invalid 'messages': expected a non-empty array.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidBody(f"messages.{i}", f"Invalid 'messages.{i}': expected an object.")
        if not isinstance(message.get("role"), str):
            raise InvalidBody(
                f"messages.{i}.role", f"Missing required parameter: 'messages.{i}.role'."
            )


def validate_body(endpoint: str, body: object) -> None:
    """Refuse, as the provider would, a body the sandbox cannot answer; raises InvalidBody."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"the sandbox does not answer {endpoint!r}")
    if not isinstance(body, Mapping):
        raise InvalidBody("body", "The request body must be a JSON object.")
    _require_model(body)
    if body.get("stream"):
        raise InvalidBody("stream", "streaming is not supported by the sandbox")
    if endpoint in (CHAT_COMPLETIONS, MESSAGES):
        _require_messages(body)
    if endpoint == CHAT_COMPLETIONS and "n" in body and not (_is_int(body["n"]) and body["n"] >= 1):
        raise InvalidBody("n", "Invalid 'n': expected an integer of at least 1.")
    if endpoint == MESSAGES:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise InvalidBody("max_tokens", "max_tokens: Field required")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise InvalidBody("max_tokens", "max_tokens: expected an integer of at least 1")
    if endpoint == RESPONSES:
        given = _required(body, "input")
        if not isinstance(given, str | list) or not given:
            raise InvalidBody("input", "Invalid 'input': expected a non-empty string or array.")
    if endpoint == EMBEDDINGS:
        embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
        if not _is_int(dimensions) or not 1 <= dimensions <= MAX_DIMENSIONS:
            raise InvalidBody(
                "dimensions",
                f"Invalid 'dimensions': expected an integer from 1 to {MAX_DIMENSIONS}.",
            )
        if body.get("encoding_format", "float") not in ("float", "base64"):
            raise InvalidBody(
                "encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'."
            )


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _prompt_text(endpoint: str, body: Mapping[str, Any]) -> str:
    """All the text a request sends, for its input token estimate."""
    texts: list[str] = []
    if endpoint == MESSAGES:
        texts.append(text_of(body.get("system")))
    if endpoint == RESPONSES:
        texts.append(text_of(body.get("instructions")))
        given = body.get("input")
        texts.extend([given] if isinstance(given, str) else map(_item_text, given or []))
    else:
        texts.extend(
            text_of(m.get("content")) for m in body.get("messages") or [] if isinstance(m, Mapping)
        )
    return "\n".join(texts)


def chat_completion(body: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """An OpenAI chat completion answering ``body``."""
    text = expected_reply(CHAT_COMPLETIONS, body)
    prompt_tokens = estimate_tokens(_prompt_text(CHAT_COMPLETIONS, body))
    completion_tokens = estimate_tokens(text)
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(int(body.get("n", 1)))
    ]
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time() if now is None else now),
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens * len(choices),
            "total_tokens": prompt_tokens + completion_tokens * len(choices),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": SANDBOX_FINGERPRINT,
    }


def responses_response(body: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """An OpenAI Responses API response answering ``body``: one completed assistant message."""
    text = expected_reply(RESPONSES, body)
    input_tokens = estimate_tokens(_prompt_text(RESPONSES, body))
    output_tokens = estimate_tokens(text)
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time() if now is None else now),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": [
            {
                "id": _new_id("msg_"),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": bool(body.get("store", True)),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def anthropic_message(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic message answering ``body``."""
    text = expected_reply(MESSAGES, body)
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": estimate_tokens(_prompt_text(MESSAGES, body)),
            "output_tokens": estimate_tokens(text),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def expected_embeddings(body: Mapping[str, Any]) -> list[list[float]]:
    """The vectors the sandbox returns for an embeddings body, in input order."""
    dimensions = int(body.get("dimensions", DEFAULT_DIMENSIONS))
    return [embedding_for(item, dimensions) for item in embedding_inputs(body.get("input"))]


def embeddings_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI embeddings list answering ``body``, in the encoding it asked for."""
    items = embedding_inputs(body.get("input"))
    dimensions = int(body.get("dimensions", DEFAULT_DIMENSIONS))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = embedding_for(item, dimensions)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_base64(vector) if as_base64 else vector,
            }
        )
    tokens = sum(estimate_tokens(x) if isinstance(x, str) else len(x) for x in items)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def respond(endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The provider-shaped answer to a body that passed :func:`validate_body`."""
    if endpoint == CHAT_COMPLETIONS:
        return chat_completion(body)
    if endpoint == RESPONSES:
        return responses_response(body)
    if endpoint == MESSAGES:
        return anthropic_message(body)
    if endpoint == EMBEDDINGS:
        return embeddings_response(body)
    raise ValueError(f"the sandbox does not answer {endpoint!r}")


def response_text(endpoint: str, response: Mapping[str, Any]) -> str:
    """The assistant text of a provider-shaped response, to compare with :func:`expected_reply`."""
    if endpoint == CHAT_COMPLETIONS:
        return text_of(response["choices"][0]["message"].get("content"))
    if endpoint == RESPONSES:
        return "".join(
            text_of(item.get("content"))
            for item in response.get("output", [])
            if item.get("type") == "message"
        )
    if endpoint == MESSAGES:
        return text_of(response.get("content"))
    raise ValueError(f"no reply text for endpoint {endpoint!r}")
