"""What every backend shares: the request's pieces, chat parsing, and the three steps.

A request goes through three steps (prepare on the host, run on the device, finish on the host)
because each wants a different place to run, and keeping them apart lets the host prepare the
next micro-batch while the device runs this one:

- ``parse`` checks one request body and ``tokenize`` turns a chunk of requests into token ids
  (pieces). This is CPU work, so the engine does it in a thread while the device runs the batch
  before; it is also where a request is refused or truncated, before it can share a batch.
- ``collate`` pads one micro-batch into tensors (pinned, copied asynchronously on CUDA),
  ``forward`` runs the model under ``torch.inference_mode``, and ``postprocess`` brings the
  results back to the host.
- ``answer`` assembles one request's provider-shaped body from its pieces' results.
"""

from __future__ import annotations

import copy
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import AutoTokenizer, PreTrainedModel

from gpu_worker.config import Kind, ModelSpec, pick_dtype
from gpu_worker.errors import ConfigError, RequestError

EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Sampling:
    """A chat request's generation knobs, checked; ``max_tokens`` None means the default."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Job:
    """One request, checked but not yet tokenised: texts or token arrays, and its knobs."""

    texts: tuple[str, ...] = ()
    token_arrays: tuple[tuple[int, ...], ...] = ()
    encoding_format: str = "float"
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def n_inputs(self) -> int:
        return len(self.texts) or len(self.token_arrays)


@dataclass(slots=True)
class Piece:
    """One input of one request, tokenised: the unit the packer places in a micro-batch.

    ``cost`` is what it takes of the token budget: its ids, plus ``max_new`` for generation.
    """

    ids: list[int]
    cost: int
    truncated: bool = False
    max_new: int = 0
    sampling: Sampling | None = None


@dataclass(slots=True)
class Batch:
    """A collated micro-batch: the model's input tensors, on the device, and its pieces."""

    inputs: dict[str, torch.Tensor]
    pieces: Sequence[Piece]


def invalid(message: str, field: str) -> RequestError:
    return RequestError("invalid_request", f"{field}: {message}", field=field)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with text content; text parts are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("missing, or not a list of messages", "messages")
    if not messages:
        raise RequestError("empty_input", "messages: an empty list", field="messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid("must be an object with a string `role`", where)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise invalid("only text content parts are served locally", where)
                if not isinstance(part.get("text"), str):
                    raise invalid("a text part needs a string `text`", where)
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise invalid("content must be a string or a list of text parts", where)
        out.append({"role": message["role"], "content": content})
    if not any(m["content"] for m in out):
        raise RequestError("empty_input", "messages: every message is empty", field="messages")
    return out


def chat_completion(
    model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The OpenAI chat completion object, as its ``/v1/chat/completions`` returns it."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class Backend(ABC):
    """Loads one model once, and turns request bodies into answers in three steps.

    The device and dtype are chosen once, here, as nanoGPT's sample.py does; every tensor the
    backend makes goes straight to that device.
    """

    kind: ClassVar[Kind]
    endpoint: ClassVar[str]
    padding_side: ClassVar[str] = "right"

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.dtype = pick_dtype(spec.dtype, device)
        self.model_dir = spec.model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model: Any = self.load_model()
        self.model = model.to(device).eval()
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ConfigError(f"model {spec.name!r}: its tokenizer has no pad or eos token")
        self.pad_id = int(pad)
        # A private copy, truncation and padding off for good: the transformers wrapper re-sets
        # them on every call, which fails ("Already borrowed") when two threads encode at once.
        self.encoder = copy.deepcopy(self.tokenizer.backend_tokenizer)
        self.encoder.no_truncation()
        self.encoder.no_padding()
        self.prefix, self.suffix = self.special_tokens()
        self.context = self.model_limit()
        if spec.max_input_tokens is not None and spec.max_input_tokens > self.context:
            raise ConfigError(
                f"model {spec.name!r}: max_input_tokens = {spec.max_input_tokens} is more than "
                f"the model takes ({self.context})"
            )
        self.max_input_tokens = spec.max_input_tokens or self.context

    @abstractmethod
    def load_model(self) -> PreTrainedModel: ...

    @abstractmethod
    def parse(self, body: Mapping[str, Any]) -> Job:
        """Check one body; raise ``RequestError`` naming the field when it cannot be served."""

    @abstractmethod
    def forward(self, batch: Batch) -> Any: ...

    @abstractmethod
    def postprocess(self, output: Any, batch: Batch) -> list[Any]:
        """One host-side result per piece, in the batch's order."""

    @abstractmethod
    def answer(self, job: Job, pieces: Sequence[Piece], results: Sequence[Any]) -> dict[str, Any]:
        """The provider-shaped body of one request."""

    @abstractmethod
    def warmup_body(self) -> dict[str, Any]: ...

    def output_tokens(self, results: Sequence[Any]) -> int:
        return 0

    def model_limit(self) -> int:
        """The longest input the model takes, specials included."""
        limits = [int(getattr(self.model.config, "max_position_embeddings", 0) or 0)]
        if 0 < self.tokenizer.model_max_length < 1_000_000:
            limits.append(int(self.tokenizer.model_max_length))
        positive = [x for x in limits if x > 0]
        return min(positive) if positive else 2048

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own, found by probing."""
        full = self.encoder.encode("hello", add_special_tokens=True).ids
        content = self.encoder.encode("hello", add_special_tokens=False).ids
        for start in range(len(full) - len(content) + 1):
            if full[start : start + len(content)] == content:
                return full[:start], full[start + len(content) :]
        return [], []

    def check_endpoint(self, endpoint: str) -> None:
        if endpoint != self.endpoint:
            raise RequestError(
                "unsupported_endpoint",
                f"model {self.spec.name!r} is a local {self.kind} model: it serves "
                f"{self.endpoint}, not {endpoint}",
                field="endpoint",
            )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without specials or truncation (the Rust encoder, GIL free)."""
        if not texts:
            return []
        return [
            e.ids for e in self.encoder.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def fit(self, content: list[int], index: int, room_after: int = 0) -> tuple[list[int], bool]:
        """Wrap ids in the model's special tokens, truncating or refusing what is too long.

        ``room_after`` is what the answer still needs of the context (generation's new tokens).
        Truncation keeps the start of an embedded or classified text, as sentence-transformers
        does, and the end of a prompt, which is the part a chat model answers.
        """
        specials = len(self.prefix) + len(self.suffix)
        limit = min(self.max_input_tokens, self.context - room_after)
        room = limit - specials
        if room < 1:
            raise RequestError(
                "context_length_exceeded",
                f"max_tokens = {room_after} leaves no room for the input in the model's "
                f"{self.context} tokens",
                field="max_tokens",
            )
        if not content and not specials:
            raise RequestError("empty_input", f"input[{index}]: has no tokens", field="input")
        truncated = len(content) > room
        if truncated:
            if not self.spec.truncate:
                raise RequestError(
                    "context_length_exceeded",
                    f"input[{index}] is {len(content) + specials} tokens; model "
                    f"{self.spec.name!r} takes at most {limit} (with truncate = true in the models "
                    "table it would be cut and flagged instead)",
                    field="input",
                )
            content = content[:room] if self.padding_side == "right" else content[-room:]
        return self.prefix + content + self.suffix, truncated

    def tokenize(self, jobs: Sequence[Job]) -> list[list[Piece] | RequestError]:
        """Pieces of each job, or the error that refuses it; one encoder call for the chunk."""
        encoded = iter(self.encode([text for job in jobs for text in job.texts]))
        out: list[list[Piece] | RequestError] = []
        for job in jobs:
            arrays = [next(encoded) for _ in job.texts] or [list(a) for a in job.token_arrays]
            try:
                out.append(self.pieces(job, arrays))
            except RequestError as exc:
                out.append(exc)
        return out

    def pieces(self, job: Job, arrays: list[list[int]]) -> list[Piece]:
        for i, array in enumerate(job.token_arrays):
            bad = next((t for t in array if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise invalid(f"token id {bad} is outside this model's vocabulary", f"input[{i}]")
        pieces = []
        for i, content in enumerate(arrays):
            ids, truncated = self.fit(content, i)
            pieces.append(Piece(ids=ids, cost=len(ids), truncated=truncated))
        return pieces

    def collate(self, pieces: Sequence[Piece]) -> Batch:
        """Pad to the longest piece; on CUDA through pinned memory, copied without blocking."""
        width = max(len(p.ids) for p in pieces)
        rows, masks = [], []
        for p in pieces:
            pad = width - len(p.ids)
            if self.padding_side == "right":
                rows.append(p.ids + [self.pad_id] * pad)
                masks.append([1] * len(p.ids) + [0] * pad)
            else:
                rows.append([self.pad_id] * pad + p.ids)
                masks.append([0] * pad + [1] * len(p.ids))
        input_ids = torch.tensor(rows, dtype=torch.long)  # (B, T)
        attention_mask = torch.tensor(masks, dtype=torch.long)  # (B, T)
        return Batch(
            {
                "input_ids": self.to_device(input_ids),
                "attention_mask": self.to_device(attention_mask),
            },
            pieces,
        )

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
