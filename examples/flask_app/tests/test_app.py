"""The example end to end with Flask's test client: a real mixbatch, a real worker.

A test posts to the view, mixbatch runs the request against the sandbox provider and sends the
result to ``mixbatch_flask.store_answer`` on the example's own Celery worker, which writes it
into the row.
"""

import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from flask_docs.db import documents, mixbatch
from flask_docs.requests import classify, embed

from routing.contrib.answers import Answer, Target
from routing.contrib.flask import write_answer
from routing.models import Result
from routing.sandbox import expected_embeddings, expected_reply
from routing.states import State

TASK = "mixbatch_flask.store_answer"
CALLBACK_QUEUE = "flask_docs.callbacks"
WaitDone = Callable[..., dict[str, Any]]
Insert = Callable[..., int]


def post(client: FlaskClient, data: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/documents", json=data)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def applied_count(app: Flask, request_id: str) -> int:
    with app.app_context(), mixbatch.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(mixbatch.applied.c.request_id == request_id)
        return int(conn.execute(query).scalar_one())


def test_post_embed_is_filled_by_the_callback(
    app: Flask, client: FlaskClient, wait_done: WaitDone
) -> None:
    text = "Invoice 2024-117: 3 hours of consulting, 450 EUR."
    created = post(client, {"text": text, "task": "embed"})
    assert created["status"] == "queued"
    assert created["request_id"], "submitted when the view's transaction committed"

    doc = wait_done(created["id"])
    assert doc["status"] == "done", doc["error"]
    assert doc["request_id"] == created["request_id"]
    assert doc["error"] is None
    expected = expected_embeddings({"model": "text-embedding-3-small", "input": text})[0]
    assert doc["embedding"] == pytest.approx(expected, abs=1e-6)
    assert applied_count(app, created["request_id"]) == 1
    assert client.get(f"/documents/{created['id']}").get_json() == doc


def test_post_classify_fills_the_label(client: FlaskClient, wait_done: WaitDone) -> None:
    text = "Dear Ms Novak, thank you for your letter of 3 May."
    created = post(client, {"text": text, "task": "classify", "lane": "urgent"})
    doc = wait_done(created["id"])
    assert doc["status"] == "done", doc["error"]
    assert doc["label"] == expected_reply("/v1/chat/completions", classify(text)["body"])
    assert doc["embedding"] is None


def test_rolled_back_transaction_enqueues_nothing(app: Flask) -> None:
    text = "This row is rolled back."
    with app.app_context():
        with pytest.raises(RuntimeError), mixbatch.transaction() as conn:
            doc_id = conn.execute(documents.insert().values(text=text)).inserted_primary_key[0]
            pending = mixbatch.enqueue(documents, doc_id, "embedding", lane="bulk", **embed(text))
            raise RuntimeError("something after enqueue failed")
        assert not pending.submitted
        assert pending.id is None
        with mixbatch.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(documents.c.text == text)
            assert conn.execute(query).scalar_one() == 0
        client = mixbatch.client
        key = client.store.keys.idempotency(client.tenant, pending.custom_id)
        assert client.store.redis.exists(key) == 0, "no request has that custom_id"
        stats = client.store.lane_stats("bulk")
        assert (stats.depth, stats.leased, sum(stats.counts.values())) == (0, 0, 0)


def test_view_rolls_back_row_and_request_on_a_bad_request(app: Flask, client: FlaskClient) -> None:
    def count() -> int:
        with app.app_context(), mixbatch.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(documents)).scalar_one())

    before = count()
    response = client.post("/documents", json={"text": "x", "lane": "no-such-lane"})
    assert response.status_code == 400
    assert "no-such-lane" in response.get_json()["error"]
    assert count() == before


def test_failed_request_records_the_error(
    app: Flask, wait_done: WaitDone, insert_document: Insert
) -> None:
    doc_id = insert_document("bad dimensions")
    body = {"model": "text-embedding-3-small", "input": "bad dimensions", "dimensions": 0}
    with app.app_context():
        pending = mixbatch.enqueue(
            documents, doc_id, "embedding", endpoint="/v1/embeddings", body=body
        )
    assert pending.submitted, "outside a transaction() block it is submitted at once"
    doc = wait_done(doc_id)
    assert doc["status"] == "failed"
    assert "dimensions" in doc["error"]
    assert doc["embedding"] is None


def test_duplicate_delivery_through_the_worker_changes_nothing(
    app: Flask, producer: Celery, wait_done: WaitDone, insert_document: Insert
) -> None:
    doc_id = insert_document("delivered twice")
    with app.app_context():
        mixbatch.enqueue(documents, doc_id, "embedding", **embed("delivered twice"))
        doc = wait_done(doc_id)
        payload = mixbatch.client.result(doc["request_id"], timeout=5).model_dump(mode="json")
        # The app changes the row after the answer arrived; a late duplicate must not undo it.
        with mixbatch.engine.begin() as conn:
            conn.execute(documents.update().where(documents.c.id == doc_id).values(embedding=[1.0]))
    for _ in range(2):
        producer.send_task(TASK, args=[payload], queue=CALLBACK_QUEUE)
    # A fresh request sent after the duplicates; the single worker process takes messages in
    # order, so once its row is filled the duplicates have been handled.
    probe = insert_document("probe")
    with app.app_context():
        mixbatch.enqueue(documents, probe, "embedding", **embed("probe"))
    wait_done(probe)
    assert wait_done(doc_id)["embedding"] == [1.0]
    assert applied_count(app, payload["id"]) == 1


def test_the_same_question_again_gets_the_stored_answer_at_once(
    app: Flask, wait_done: WaitDone, insert_document: Insert, wait_for: Callable[..., None]
) -> None:
    doc_id = insert_document("asked twice")
    with app.app_context():
        mixbatch.enqueue(documents, doc_id, "embedding", **embed("asked twice"))
        first = wait_done(doc_id)
        # What a recreated database holds: a row with the same primary key asking the same
        # question, unanswered, and no record of the delivery. mixbatch returns the first
        # request, whose answer went out long ago; enqueue applies the stored result itself.
        with mixbatch.engine.begin() as conn:
            conn.execute(mixbatch.applied.delete())
            reset = {"embedding": None, "mixbatch_status": "queued", "mixbatch_request_id": None}
            conn.execute(documents.update().where(documents.c.id == doc_id).values(reset))
        again = mixbatch.enqueue(documents, doc_id, "embedding", **embed("asked twice"))
        assert again.ticket is not None and again.ticket.duplicate
        assert again.id == first["request_id"]
        doc = wait_done(doc_id, timeout_s=0.5)
        assert (doc["status"], doc["embedding"]) == ("done", first["embedding"])

        # A changed question for the same row is a new request, answered in its turn.
        changed = mixbatch.enqueue(documents, doc_id, "embedding", **embed("asked differently"))
        assert changed.ticket is not None and not changed.ticket.duplicate
    wait_for(lambda: wait_done(doc_id)["request_id"] == changed.id, 45, "the new answer")


def result_for(doc_id: int, column: str = "label") -> dict[str, Any]:
    now = time.time()
    return Result(
        id=f"standard.{uuid.uuid4().hex[:20].upper()}",
        custom_id=Target("documents", str(doc_id), column).custom_id,
        lane="standard",
        status=State.DONE,
        body={"choices": [{"message": {"role": "assistant", "content": " Invoice "}}]},
        deadline=now + 60,
        created_at=now,
        finished_at=now,
    ).model_dump(mode="json")


def test_apply_result_twice_writes_once(app: Flask, insert_document: Insert) -> None:
    doc_id = insert_document("t", task="classify")
    result = result_for(doc_id)
    writes: list[str] = []

    def normalise(conn: sa.Connection, table: sa.Table, answer: Answer) -> None:
        writes.append(answer.request_id)
        write_answer(conn, table, replace(answer, value=answer.value.strip().lower()))

    with app.app_context():
        assert mixbatch.apply_result(result, write=normalise) is True
        assert mixbatch.apply_result(result, write=normalise) is False
        with mixbatch.engine.connect() as conn:
            row = (
                conn.execute(sa.select(documents).where(documents.c.id == doc_id)).mappings().one()
            )
    assert writes == [result["id"]]
    assert (row["label"], row["mixbatch_status"], row["mixbatch_request_id"]) == (
        "invoice",
        "done",
        result["id"],
    )


def test_apply_result_for_a_deleted_row_is_skipped(app: Flask, insert_document: Insert) -> None:
    doc_id = insert_document("gone")
    with app.app_context():
        with mixbatch.engine.begin() as conn:
            conn.execute(documents.delete().where(documents.c.id == doc_id))
        assert mixbatch.apply_result(result_for(doc_id)) is False
        assert mixbatch.apply_result(result_for(doc_id)) is False
