"""``classification`` on /v1/chat/completions: the text of the last user message is classified.

The answer is an OpenAI chat completion whose ``message.content`` is the top label, with one
extra top-level key ``"mixbatch": {"labels": [...], "scores": [...]}`` (every label of
``config.id2label`` in id order, softmax scores, or sigmoid ones for a multi-label head).
There is no provider endpoint for classification, so chat is the shape every SDK already
parses, and the extra key is ignored by those that do not know it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from gpu_worker.backends.base import (
    CHAT,
    Backend,
    Batch,
    Job,
    Piece,
    chat_completion,
    chat_messages,
    invalid,
)
from gpu_worker.errors import RequestError


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
            raise invalid("a classification model needs a user message to classify", "messages")
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
