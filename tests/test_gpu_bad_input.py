"""Bad input is a clear per-request error, and the rest of its micro-batch is served unchanged.

Each case runs in one ``run`` call between good requests; the good ones must come back exactly
as they do when they run alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from typing import Any

import numpy as np
import pytest
import torch

from gpu_worker.config import ModelSpec, load_models
from gpu_worker.engine import Engine, LocalAnswer, LocalRequest
from gpu_worker.registry import Registry

CPU = torch.device("cpu")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LONG = "word " * 400
GOOD = ["a good request", "another good one, a little longer than the first"]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_models()[MODEL]


@pytest.fixture(scope="module")
def engine(spec: ModelSpec) -> Engine:
    return Engine(spec, CPU)


@pytest.fixture(scope="module")
def strict(spec: ModelSpec) -> Engine:
    """The same model with ``truncate = false``: long inputs are refused, not cut."""
    return Engine(spec.model_copy(update={"truncate": False}), CPU)


@pytest.fixture(scope="module")
def alone(engine: Engine) -> list[np.ndarray]:
    return [embedding(a) for a in engine.run([embed(f"alone{i}", t) for i, t in enumerate(GOOD)])]


def embed(rid: str, value: Any, **extra: Any) -> LocalRequest:
    body = {"model": MODEL, "input": value, **extra}
    return LocalRequest(rid, "/v1/embeddings", body, "bulk", time.time() + 60)


def embedding(answer: LocalAnswer) -> np.ndarray:
    assert answer.ok and answer.body, answer.error
    return np.asarray(answer.body["data"][0]["embedding"])


def run_between_good(engine: Engine, bad: LocalRequest, alone: list[np.ndarray]) -> LocalAnswer:
    """The bad request in the middle of one call; the good ones must be served as if alone."""
    first, answer, second = engine.run([embed("good0", GOOD[0]), bad, embed("good1", GOOD[1])])
    for good, expected in zip((first, second), alone, strict=True):
        assert good.status_code == 200
        assert np.allclose(embedding(good), expected, atol=1e-5)
    return answer


def assert_error(answer: LocalAnswer, status: int, code: str, *words: str) -> None:
    assert answer.body is None and answer.error is not None
    assert (answer.status_code, answer.error["code"]) == (status, code)
    for word in words:
        assert word in answer.error["message"]


def test_input_over_the_limit_is_refused_when_truncation_is_off(
    strict: Engine, alone: list[np.ndarray]
) -> None:
    answer = run_between_good(strict, embed("long", LONG), alone)
    assert_error(answer, 400, "context_length_exceeded", "input[0]", "256", "truncate")


def test_input_over_the_limit_is_cut_and_flagged_when_truncation_is_on(
    engine: Engine, alone: list[np.ndarray]
) -> None:
    answer = run_between_good(engine, embed("long", ["short", LONG]), alone)
    assert answer.ok and answer.truncated and answer.body
    assert answer.body["usage"]["prompt_tokens"] == 256 + 3
    (short,) = engine.run([embed("short", "short")])
    assert not short.truncated


@pytest.mark.parametrize(
    ("value", "where"),
    [("", "input[0]"), ([], "input"), (["fine", ""], "input[1]"), ([[]], "input[0]")],
)
def test_empty_input(engine: Engine, alone: list[np.ndarray], value: Any, where: str) -> None:
    answer = run_between_good(engine, embed("empty", value), alone)
    assert_error(answer, 400, "empty_input", where)


@pytest.mark.parametrize("value", [["text", [1, 2, 3]], [[1, 2], "text"], ["text", 7]])
def test_strings_mixed_with_token_arrays(
    engine: Engine, alone: list[np.ndarray], value: Any
) -> None:
    answer = run_between_good(engine, embed("mixed", value), alone)
    assert_error(answer, 400, "mixed_input", "strings and token arrays")


def test_a_chat_request_sent_to_an_embedding_model(engine: Engine, alone: list[np.ndarray]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    chat = LocalRequest("chat", "/v1/chat/completions", body)
    answer = run_between_good(engine, chat, alone)
    assert_error(answer, 400, "unsupported_endpoint", "embedding model", "/v1/embeddings")


def test_an_unknown_local_model(spec: ModelSpec, alone: list[np.ndarray]) -> None:
    registry = Registry({MODEL: spec}, CPU)
    unknown = LocalRequest("unknown", "/v1/embeddings", {"model": "not-here", "input": "hi"})
    missing = LocalRequest("missing", "/v1/embeddings", {"input": "hi"})
    first, bad, worse, second = registry.run(
        [embed("good0", GOOD[0]), unknown, missing, embed("good1", GOOD[1])]
    )
    assert_error(bad, 404, "model_not_found", "'not-here'", MODEL)
    assert_error(worse, 400, "invalid_request", "model")
    assert np.allclose(embedding(first), alone[0], atol=1e-5)
    assert np.allclose(embedding(second), alone[1], atol=1e-5)


@pytest.mark.parametrize(
    ("value", "extra", "words"),
    [
        ([[1, 2, 10**9]], {}, ["1000000000", "vocabulary"]),
        (42, {}, ["input"]),
        ([{"text": "x"}], {}, ["input"]),
        ("hi", {"dimensions": 1536}, ["dimensions", "384"]),
        ("hi", {"encoding_format": "int8"}, ["encoding_format"]),
    ],
)
def test_other_malformed_bodies(
    engine: Engine, alone: list[np.ndarray], value: Any, extra: dict[str, Any], words: list[str]
) -> None:
    answer = run_between_good(engine, embed("bad", value, **extra), alone)
    assert_error(answer, 400, "invalid_request", *words)


def test_a_deadline_that_is_not_a_number(engine: Engine, alone: list[np.ndarray]) -> None:
    nan = LocalRequest("nan", "/v1/embeddings", {"input": "hi"}, "bulk", float("nan"))
    answer = run_between_good(engine, nan, alone)
    assert_error(answer, 400, "invalid_request", "deadline")


def test_many_bad_requests_in_one_batch_cost_the_good_ones_nothing(
    engine: Engine, alone: list[np.ndarray]
) -> None:
    chat = LocalRequest("chat", "/v1/chat/completions", {"messages": []})
    requests = [
        embed("good0", GOOD[0]),
        embed("empty", ""),
        embed("mixed", ["a", [1]]),
        chat,
        embed("long", LONG),
        embed("good1", GOOD[1]),
    ]
    answers = engine.run(requests)
    assert [a.id for a in answers] == [r.id for r in requests]
    assert [a.status_code for a in answers] == [200, 400, 400, 400, 200, 200]
    assert answers[4].truncated
    assert np.allclose(embedding(answers[0]), alone[0], atol=1e-5)
    assert np.allclose(embedding(answers[5]), alone[1], atol=1e-5)
