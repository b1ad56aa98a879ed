"""One backend per kind of model, each split into tokenise, forward and postprocess.

The split is infinity's (``transformer/abstract.py``: encode_pre, encode_core, encode_post),
because the three steps want different places to run:

- ``parse`` checks one request body and ``tokenize`` turns a chunk of requests into token ids
  (pieces). This is CPU work, so the engine does it in a thread while the device runs the batch
  before; it is also where a request is refused or truncated, before it can share a batch.
- ``collate`` pads one micro-batch into tensors (pinned, copied asynchronously on CUDA),
  ``forward`` runs the model under ``torch.inference_mode``, and ``postprocess`` brings the
  results back to the host.
- ``answer`` assembles one request's provider-shaped body from its pieces' results.

What each kind serves:

- ``embedding`` on /v1/embeddings: pooling and normalisation as the model's sentence-transformers
  files say (``modules.json``, ``1_Pooling/config.json``), so vectors match
  ``SentenceTransformer.encode``; the OpenAI embeddings response.
- ``classification`` on /v1/chat/completions: the text of the last user message is classified;
  the answer is an OpenAI chat completion whose ``message.content`` is the top label, with one
  extra top-level key ``"mixbatch": {"labels": [...], "scores": [...]}`` (every label of
  ``config.id2label`` in id order, softmax scores, or sigmoid ones for a multi-label head).
  There is no provider endpoint for classification, so chat is the shape every SDK already
  parses, and the extra key is ignored by those that do not know it.
- ``generation`` on /v1/chat/completions: ``generate`` with the body's ``max_tokens``,
  ``temperature`` (0: greedy), ``top_p`` and ``stop``; the OpenAI chat completion response.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from gpu_worker.config import Kind, ModelSpec, pick_dtype
from gpu_worker.errors import ConfigError, RequestError

EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
"""sentence-transformers' order: several modes are concatenated in this order."""
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
MAX_STOP_STRINGS = 4


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


@dataclass(frozen=True, slots=True)
class Completion:
    """One generated answer, on the host."""

    text: str
    completion_tokens: int
    finish_reason: str


def _invalid(message: str, field: str) -> RequestError:
    return RequestError("invalid_request", f"{field}: {message}", field=field)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with text content; text parts are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("missing, or not a list of messages", "messages")
    if not messages:
        raise RequestError("empty_input", "messages: an empty list", field="messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid("must be an object with a string `role`", where)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _invalid("only text content parts are served locally", where)
                if not isinstance(part.get("text"), str):
                    raise _invalid("a text part needs a string `text`", where)
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _invalid("content must be a string or a list of text parts", where)
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
                raise _invalid(f"token id {bad} is outside this model's vocabulary", f"input[{i}]")
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


class EmbeddingBackend(Backend):
    """A transformer encoder, pooled and normalised as its sentence-transformers files say."""

    kind = "embedding"
    endpoint = EMBEDDINGS

    def load_model(self) -> PreTrainedModel:
        self.lowercase = False
        self.pooling, self.normalize, self.st_max_seq = self.sentence_transformers_config()
        model: PreTrainedModel = AutoModel.from_pretrained(
            self.model_dir, dtype=self.dtype, local_files_only=True
        )
        hidden = int(model.config.hidden_size)
        self.dim = hidden * len(self.pooling)
        return model

    def sentence_transformers_config(self) -> tuple[tuple[str, ...], bool, int | None]:
        """Pooling modes, whether to normalise, and max_seq_length; mean + normalise if absent.

        A module this backend does not implement (a Dense projection, say) is refused at load:
        serving vectors that differ from the model's own would be worse than not serving them.
        """
        max_seq = None
        bert_config = self.model_dir / "sentence_bert_config.json"
        if bert_config.is_file():
            settings = _read_json(bert_config)
            max_seq = settings.get("max_seq_length")
            self.lowercase = bool(settings.get("do_lower_case"))
        modules_file = self.model_dir / "modules.json"
        if not modules_file.is_file():
            return ("mean",), True, max_seq
        pooling: tuple[str, ...] = ("mean",)
        normalize = False
        for module in _read_json(modules_file):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pooling = self.pooling_modes(
                    self.model_dir / module.get("path", "") / "config.json"
                )
            elif kind != "Transformer":
                raise ConfigError(
                    f"model {self.spec.name!r}: sentence-transformers module {kind!r} is not "
                    "served by the local route"
                )
        return pooling, normalize, max_seq

    def pooling_modes(self, path: Path) -> tuple[str, ...]:
        """Modes from a Pooling config, old style (``pooling_mode_mean_tokens: true``) or new."""
        config = _read_json(path)
        named = config.get("pooling_mode")
        if isinstance(named, str | list):
            wanted = {named} if isinstance(named, str) else set(named)
        else:
            wanted = {
                ST_POOLING_KEYS.get(k, k)
                for k, v in config.items()
                if k.startswith("pooling_mode_") and v is True
            }
        unknown = wanted - set(POOLING_MODES)
        if unknown or not wanted:
            raise ConfigError(
                f"{path}: pooling {sorted(unknown) or 'none'} is not served by the local route "
                f"(served: {', '.join(POOLING_MODES)})"
            )
        return tuple(m for m in POOLING_MODES if m in wanted)

    def model_limit(self) -> int:
        limit = super().model_limit()
        return min(limit, self.st_max_seq) if self.st_max_seq else limit

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """As sentence-transformers does, lowercases first when its config says so."""
        return super().encode([t.lower() for t in texts] if self.lowercase else texts)

    def parse(self, body: Mapping[str, Any]) -> Job:
        """``input`` as OpenAI takes it; token arrays are this model's own ids, without special
        tokens (they are added as for text)."""
        raw = body.get("input")
        texts: tuple[str, ...] = ()
        arrays: tuple[tuple[int, ...], ...] = ()
        if isinstance(raw, str):
            texts = (raw,)
        elif isinstance(raw, list):
            if not raw:
                raise RequestError("empty_input", "input: an empty list", field="input")
            if all(isinstance(x, str) for x in raw):
                texts = tuple(raw)
            elif all(_is_int(x) for x in raw):
                arrays = (tuple(raw),)
            elif all(isinstance(x, list) and all(_is_int(t) for t in x) for x in raw):
                arrays = tuple(tuple(x) for x in raw)
            elif any(isinstance(x, str) for x in raw):
                raise RequestError(
                    "mixed_input",
                    "input: mixes strings and token arrays; send one kind per request",
                    field="input",
                )
            else:
                raise _invalid(
                    "must be a list of strings, a token array or a list of them", "input"
                )
        else:
            raise _invalid("missing, or not a string, a list of strings or token arrays", "input")
        for i, item in enumerate(texts or arrays):
            if not item:
                raise RequestError("empty_input", f"input[{i}]: is empty", field="input")
        encoding_format = body.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise _invalid("must be 'float' or 'base64'", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.dim:
            raise _invalid(
                f"model {self.spec.name!r} returns {self.dim} dimensions, not {dimensions!r}",
                "dimensions",
            )
        return Job(texts=texts, token_arrays=arrays, encoding_format=encoding_format)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        mask = batch.inputs["attention_mask"]  # (B, T)
        hidden = self.model(**batch.inputs).last_hidden_state.float()  # (B, T, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        pooled = []
        for mode in self.pooling:
            if mode == "cls":
                pooled.append(hidden[:, 0])  # (B, H)
            elif mode == "max":
                pooled.append(hidden.masked_fill(m == 0, float("-inf")).amax(dim=1))
            elif mode == "mean":
                pooled.append((hidden * m).sum(dim=1) / counts)
            elif mode == "mean_sqrt_len":
                pooled.append((hidden * m).sum(dim=1) / counts.sqrt())
            else:
                last = mask.sum(dim=1) - 1  # (B,)
                pooled.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        out = torch.cat(pooled, dim=1)  # (B, D)
        return F.normalize(out, p=2, dim=1) if self.normalize else out

    def postprocess(self, output: torch.Tensor, batch: Batch) -> list[Any]:
        return list(output.cpu().numpy())

    def answer(self, job: Job, pieces: Sequence[Piece], results: Sequence[Any]) -> dict[str, Any]:
        data = []
        for i, vector in enumerate(results):
            if job.encoding_format == "base64":
                value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(p.ids) for p in pieces)
        return {
            "object": "list",
            "data": data,
            "model": self.spec.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def warmup_body(self) -> dict[str, Any]:
        return {"model": self.spec.name, "input": ["warm up", "warm up the model " * 8]}


class ClassificationBackend(Backend):
    """A sequence-classification head; labels from ``config.id2label``."""

    kind = "classification"
    endpoint = CHAT

    def load_model(self) -> PreTrainedModel:
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, dtype=self.dtype, local_files_only=True
        )
        id2label: dict[Any, Any] = dict(model.config.id2label or {})
        count = int(model.config.num_labels or len(id2label))
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]
        self.multi_label = model.config.problem_type == "multi_label_classification"
        return model

    def parse(self, body: Mapping[str, Any]) -> Job:
        users = [m for m in chat_messages(body) if m["role"] == "user"]
        if not users:
            raise _invalid("a classification model needs a user message to classify", "messages")
        if not users[-1]["content"]:
            raise RequestError(
                "empty_input", "messages: the last user message is empty", field="messages"
            )
        return Job(texts=(users[-1]["content"],))

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        logits = self.model(**batch.inputs).logits.float()  # (B, C)
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)

    def postprocess(self, output: torch.Tensor, batch: Batch) -> list[Any]:
        return output.cpu().tolist()

    def answer(self, job: Job, pieces: Sequence[Piece], results: Sequence[Any]) -> dict[str, Any]:
        scores: list[float] = results[0]
        top = max(range(len(scores)), key=scores.__getitem__)
        body = chat_completion(self.spec.name, self.labels[top], "stop", len(pieces[0].ids), 0)
        body["mixbatch"] = {"labels": list(self.labels), "scores": scores}
        return body

    def warmup_body(self) -> dict[str, Any]:
        return {"model": self.spec.name, "messages": [{"role": "user", "content": "warm up"}]}


class _RowStop(StoppingCriteria):
    """Stops each row on its own: its ``max_tokens``, its stop strings, or an eos token.

    ``generate`` keeps one flag per row, so rows with different limits and stop strings share a
    batch; ``ended`` records how many tokens each row had made when it stopped, and why.
    """

    def __init__(
        self, tokenizer: Any, prompt_len: int, pieces: Sequence[Piece], eos: set[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new = [p.max_new for p in pieces]
        self.stops = [p.sampling.stop if p.sampling else () for p in pieces]
        self.eos = eos
        self.ended: list[tuple[int, str] | None] = [None] * len(pieces)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        made = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for i, token in enumerate(last):
            if self.ended[i] is not None:
                continue
            if token in self.eos:
                self.ended[i] = (made, "eos")
            elif self.stops[i] and any(
                s
                in self.tokenizer.decode(
                    input_ids[i, self.prompt_len :].tolist(), skip_special_tokens=True
                )
                for s in self.stops[i]
            ):
                self.ended[i] = (made, "stop")
            elif made >= self.max_new[i]:
                self.ended[i] = (made, "length")
        done = [e is not None for e in self.ended]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GenerationBackend(Backend):
    """A causal LM through ``generate``; prompts are left-padded so every row ends together."""

    kind = "generation"
    endpoint = CHAT
    padding_side = "left"

    def load_model(self) -> PreTrainedModel:
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, local_files_only=True
        )
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        return model

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """A chat template writes its own special tokens; a plain prompt gets the tokenizer's."""
        return ([], []) if self.has_template else super().special_tokens()

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.has_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return str(text)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def parse(self, body: Mapping[str, Any]) -> Job:
        messages = chat_messages(body)
        if body.get("stream"):
            raise _invalid("streaming is not served by the local route", "stream")
        n = body.get("n", 1)
        if n not in (1, None):
            raise _invalid("only n = 1 is served by the local route", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise _invalid("must be a positive integer", "max_tokens")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise _invalid("must be a number from 0 to 2", "temperature")
        top_p = body.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise _invalid("must be a number above 0, at most 1", "top_p")
        stop = body.get("stop")
        stops: tuple[str, ...]
        if stop is None:
            stops = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise _invalid("must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise _invalid(f"at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        sampling = Sampling(max_tokens, float(temperature), float(top_p), stops)
        return Job(texts=(self.prompt(messages),), sampling=sampling)

    def pieces(self, job: Job, arrays: list[list[int]]) -> list[Piece]:
        (content,) = arrays
        wanted = job.sampling.max_tokens
        if wanted is not None and wanted >= self.context:
            raise _invalid(
                f"{wanted} is more than the model's context of {self.context} tokens", "max_tokens"
            )
        default = max(1, self.context - len(content) - 1)
        max_new = wanted or min(self.spec.default_max_tokens, default)
        ids, truncated = self.fit(content, 0, room_after=max_new)
        return [Piece(ids, len(ids) + max_new, truncated, max_new, job.sampling)]

    @torch.inference_mode()
    def forward(self, batch: Batch) -> list[tuple[list[int], tuple[int, str]]]:
        """Each row's new tokens and how it ended; one ``generate`` per sampling setting."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, p in enumerate(batch.pieces):
            s = p.sampling or Sampling()
            key = (0.0, 1.0) if s.temperature == 0 else (s.temperature, s.top_p)
            groups.setdefault(key, []).append(i)
        out: list[tuple[list[int], tuple[int, str]]] = [([], (0, "length"))] * len(batch.pieces)
        for (temperature, top_p), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            input_ids = batch.inputs["input_ids"].index_select(0, index)  # (b, T)
            mask = batch.inputs["attention_mask"].index_select(0, index)  # (b, T)
            start = int(
                mask.any(dim=0).int().argmax()
            )  # drop columns that are padding in every row
            input_ids, mask = input_ids[:, start:], mask[:, start:]
            pieces = [batch.pieces[i] for i in rows]
            stop = _RowStop(self.tokenizer, input_ids.shape[1], pieces, self.eos)
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            config = GenerationConfig(
                max_new_tokens=max(p.max_new for p in pieces),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos) or None,
                **sampling,
            )
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stop]),
            )  # (b, T + new)
            new = sequences[:, input_ids.shape[1] :].tolist()
            for j, row in enumerate(rows):
                ended = stop.ended[j] or (len(new[j]), "length")
                out[row] = (new[j][: ended[0]], ended)
        return out

    def postprocess(
        self, output: list[tuple[list[int], tuple[int, str]]], batch: Batch
    ) -> list[Any]:
        results = []
        for (ids, (made, why)), piece in zip(output, batch.pieces, strict=True):
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            finish = "length" if why == "length" else "stop"
            stops = piece.sampling.stop if piece.sampling else ()
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            tokens = made - 1 if why == "eos" else made
            results.append(Completion(text, tokens, finish))
        return results

    def output_tokens(self, results: Sequence[Any]) -> int:
        return sum(r.completion_tokens for r in results)

    def answer(self, job: Job, pieces: Sequence[Piece], results: Sequence[Any]) -> dict[str, Any]:
        done: Completion = results[0]
        return chat_completion(
            self.spec.name,
            done.text,
            done.finish_reason,
            len(pieces[0].ids),
            done.completion_tokens,
        )

    def warmup_body(self) -> dict[str, Any]:
        return {
            "model": self.spec.name,
            "messages": [{"role": "user", "content": "warm up"}],
            "max_tokens": 2,
            "temperature": 0,
        }


BACKENDS: dict[str, type[Backend]] = {
    "embedding": EmbeddingBackend,
    "classification": ClassificationBackend,
    "generation": GenerationBackend,
}


def load_backend(spec: ModelSpec, device: torch.device) -> Backend:
    """The backend for ``spec.kind``, model loaded on ``device`` in the spec's dtype."""
    return BACKENDS[spec.kind](spec, device)
