"""One backend per kind of model (``embedding``, ``classification``, ``generation``), each a
``base.Backend`` split into tokenise, forward and postprocess; ``load_backend`` picks by kind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpu_worker.backends.base import Backend
from gpu_worker.backends.classification import ClassificationBackend
from gpu_worker.backends.embedding import EmbeddingBackend
from gpu_worker.backends.generation import GenerationBackend
from gpu_worker.config import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["BACKENDS", "load_backend"]

BACKENDS: dict[str, type[Backend]] = {
    "embedding": EmbeddingBackend,
    "classification": ClassificationBackend,
    "generation": GenerationBackend,
}


def load_backend(spec: ModelSpec, device: torch.device) -> Backend:
    """The backend for ``spec.kind``, model loaded on ``device`` in the spec's dtype."""
    return BACKENDS[spec.kind](spec, device)
