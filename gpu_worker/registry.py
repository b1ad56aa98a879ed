"""Model names to engines: each engine is loaded (and warmed) once per process, on first use.

A Celery worker process builds one ``Registry`` at start and asks it for engines as requests
name models; loading is lazy so a worker serving one model never loads the others, and it
happens under a lock so two threads asking for the same model at once load it once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_worker.config import ModelSpec, load_models, pick_device
from gpu_worker.engine import Engine, LocalAnswer, LocalRequest
from gpu_worker.errors import RequestError, UnknownModel

if TYPE_CHECKING:
    import torch


class Registry:
    """The served models of this process; ``engine_options`` go to every ``Engine``."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        device: torch.device | None = None,
        **engine_options: Any,
    ) -> None:
        self.specs = dict(specs)
        self.device = device or pick_device()
        self.engine_options = engine_options
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # ids of the runs in flight
        self._cancelled: set[str] = set()  # of those, the ones cancelled

    @classmethod
    def from_file(
        cls, path: Path | None = None, device_override: str | None = None, **engine_options: Any
    ) -> Registry:
        """The table at ``path`` (default config/models.toml) on the chosen device.

        ``device_override`` is the value of MIXBATCH_GPU_DEVICE, read by the caller."""
        return cls(load_models(path), pick_device(device_override), **engine_options)

    def served(self) -> list[str]:
        """Every name a request may use, aliases included."""
        return sorted(self.specs)

    def spec(self, name: object) -> ModelSpec:
        if not isinstance(name, str) or name not in self.specs:
            raise UnknownModel(name, self.served())
        return self.specs[name]

    def engine(self, name: object) -> Engine:
        """The loaded, warmed engine for ``name`` (or an alias); ``UnknownModel`` if none."""
        spec = self.spec(name)
        with self._lock:
            engine = self._engines.get(spec.name)
            if engine is None:
                engine = Engine(spec, self.device, **self.engine_options)
                self._engines[spec.name] = engine
            return engine

    def loaded(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def stats(self) -> dict[str, dict[str, Any]]:
        """``Engine.stats()`` of each loaded model, by canonical name."""
        return {engine.spec.name: engine.stats() for engine in self.loaded()}

    def run(self, requests: Sequence[LocalRequest]) -> list[LocalAnswer]:
        """One answer per request, in order, each to the model its ``body.model`` names.

        An unknown or missing model is that request's error (404 / 400); the others are served.
        Models are run one after another, the one with the most urgent request first.
        """
        answers: dict[int, LocalAnswer] = {}
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            name = request.body.get("model")
            try:
                if name is None:
                    raise RequestError("invalid_request", "model: missing", field="model")
                groups.setdefault(self.spec(name).name, []).append(i)
            except RequestError as exc:
                answers[i] = LocalAnswer.failed(request.id, exc)
        order = sorted(groups.items(), key=lambda g: min(requests[i].deadline for i in g[1]))
        ids = {r.id for r in requests}
        with self._lock:
            self._waiting |= ids
        try:
            for name, indices in order:
                with self._lock:
                    gone = self._cancelled & {requests[i].id for i in indices}
                for i in indices:
                    if requests[i].id in gone:
                        answers[i] = Engine.dropped_answer(requests[i].id)
                keep = [i for i in indices if requests[i].id not in gone]
                served = self.engine(name).run([requests[i] for i in keep]) if keep else []
                answers.update(zip(keep, served, strict=True))
        finally:
            with self._lock:
                self._waiting -= ids
                self._cancelled -= ids
        return [answers[i] for i in range(len(requests))]

    def cancel(self, request_ids: Sequence[str]) -> int:
        """Drop these requests before they reach a device: the ones a model is serving now
        (``Engine.cancel``), and the ones of this run waiting for their model's turn."""
        with self._lock:
            self._cancelled |= self._waiting & set(request_ids)
        return sum(engine.cancel(request_ids) for engine in self.loaded())
