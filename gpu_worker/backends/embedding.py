"""``embedding`` on /v1/embeddings: a transformer encoder, pooled and normalised as its
sentence-transformers files say (``modules.json``, ``1_Pooling/config.json``), so vectors match
``SentenceTransformer.encode``; the OpenAI embeddings response.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedModel

from gpu_worker.backends.base import EMBEDDINGS, Backend, Batch, Job, Piece, invalid, is_int
from gpu_worker.errors import ConfigError, RequestError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
"""sentence-transformers' order: several modes are concatenated in this order."""
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


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
            elif all(is_int(x) for x in raw):
                arrays = (tuple(raw),)
            elif all(isinstance(x, list) and all(is_int(t) for t in x) for x in raw):
                arrays = tuple(tuple(x) for x in raw)
            elif any(isinstance(x, str) for x in raw):
                raise RequestError(
                    "mixed_input",
                    "input: mixes strings and token arrays; send one kind per request",
                    field="input",
                )
            else:
                raise invalid("must be a list of strings, a token array or a list of them", "input")
        else:
            raise invalid("missing, or not a string, a list of strings or token arrays", "input")
        for i, item in enumerate(texts or arrays):
            if not item:
                raise RequestError("empty_input", f"input[{i}]: is empty", field="input")
        encoding_format = body.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise invalid("must be 'float' or 'base64'", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.dim:
            raise invalid(
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
