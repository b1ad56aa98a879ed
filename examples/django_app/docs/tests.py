"""The example end to end, with Django's test runner: ``python manage.py test``.

Nothing is faked. ``setUpClass`` starts a whole mixbatch (an embedded Redis, the sandbox
provider, a service worker and beat, via ``tasks.cli.stack.LocalStack``) and this project's own
Celery worker on ``docs.callbacks``. A test posts to the view, mixbatch runs the request against
the sandbox, sends the result to ``mixbatch_django.store_answer``, and the worker writes it into
the row. The test database is a SQLite *file* (``DATABASES["default"]["TEST"]["NAME"]``) so the
worker, a separate process, writes into the database the test reads; ``TransactionTestCase``
because ``on_commit`` needs real commits.

Set ``DOCS_TEST_REDIS_URL`` to use a Redis of your own instead of an embedded one: a database
nothing else uses, since Celery's queues there are shared by every worker that connects.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery import Celery
from django.db import connection, transaction
from django.test import TransactionTestCase, override_settings

from docs.models import Document
from docs.requests import classify, embed
from routing.contrib.django import (
    Answer,
    apply_result,
    enqueue,
    get_client,
    target_for,
    write_answer,
)
from routing.contrib.django.models import AppliedResult
from routing.models import Result
from routing.sandbox import Knobs, expected_embeddings, expected_reply
from routing.states import State
from tasks.cli.stack import LocalStack

PROJECT_DIR = Path(__file__).resolve().parent.parent
CALLBACK_QUEUE = "docs.callbacks"
TASK = "mixbatch_django.store_answer"
#: Beat and the sweeper run often, and no provider batches: answers come back in a second or two.
FAST = {
    "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
    "MIXBATCH_SWEEP_INTERVAL_S": "1",
    "MIXBATCH_BATCH_ENABLED": "false",
    "MIXBATCH_LOG_LEVEL": "WARNING",
    # The service's workers are not Django processes; keep Celery's Django fixup out of them.
    "DJANGO_SETTINGS_MODULE": "",
}


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class DocumentsEndToEnd(TransactionTestCase):
    stack: LocalStack
    namespace: str
    producer: Celery

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        data_dir = Path(tempfile.mkdtemp(prefix="docs-mixbatch-"))
        cls.addClassCleanup(shutil.rmtree, data_dir, ignore_errors=True)
        cls.namespace = f"docs{uuid.uuid4().hex[:8]}"
        cls.stack = LocalStack(
            data_dir,
            redis_url=os.environ.get("DOCS_TEST_REDIS_URL") or None,
            namespace=cls.namespace,
            knobs=Knobs(latency_ms=5),
            env=FAST,
        )
        cls.stack.start()
        cls.addClassCleanup(cls.stack.stop)
        cls.stack.start_worker("service", concurrency=2)
        cls.stack.start_beat()
        cls._start_callback_worker()
        cls.stack.wait_workers(["service", "callbacks"])
        override = override_settings(
            MIXBATCH={
                "REDIS_URL": cls.stack.url,
                "NAMESPACE": cls.namespace,
                "CALLBACK_QUEUE": CALLBACK_QUEUE,
            }
        )
        override.enable()
        cls.addClassCleanup(override.disable)
        cls.producer = Celery("docs-tests", broker=cls.stack.url, set_as_current=False)
        cls.addClassCleanup(cls.producer.close)

    @classmethod
    def _start_callback_worker(cls) -> None:
        """This project's worker (``celery -A project worker -Q docs.callbacks``), on the test
        database. One process, so messages are taken in the order they were sent."""
        env = cls.stack.env() | {
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DOCS_DATABASE": str(connection.settings_dict["NAME"]),
        }
        argv = [
            sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", CALLBACK_QUEUE,
            "-c", "1", "-n", "callbacks@%h", "--without-gossip", "--without-mingle",
            "-l", "WARNING",
        ]  # fmt: skip
        log = (cls.stack.log_dir / "callbacks.log").open("ab")
        cls.addClassCleanup(log.close)
        proc = subprocess.Popen(
            argv, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        cls.stack.procs["callbacks"] = proc  # stopped, and watched, with the stack's own

    def wait_done(self, pk: int, timeout_s: float = 45) -> Document:
        def finished() -> bool:
            return Document.objects.get(pk=pk).mixbatch_status != "queued"

        try:
            wait_for(finished, timeout_s, f"document {pk} to be filled by the callback")
        except AssertionError:
            logs = sorted(self.stack.log_dir.glob("*.log"))
            tails = {p.name: p.read_text(errors="replace")[-2000:] for p in logs}
            raise AssertionError(f"document {pk} never filled; worker logs: {tails}") from None
        return Document.objects.get(pk=pk)

    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/documents/", data, content_type="application/json")
        self.assertEqual(response.status_code, 201, response.content)
        return response.json()

    def test_post_embed_is_filled_by_the_callback(self) -> None:
        text = "Invoice 2024-117: 3 hours of consulting, 450 EUR."
        created = self.post({"text": text, "task": "embed"})
        self.assertEqual(created["status"], "queued")
        self.assertTrue(created["request_id"], "submitted when the view's transaction committed")

        doc = self.wait_done(created["id"])
        self.assertEqual(doc.mixbatch_status, "done", doc.mixbatch_error)
        self.assertEqual(doc.mixbatch_request_id, created["request_id"])
        self.assertEqual(doc.mixbatch_error, "")
        expected = expected_embeddings({"model": "text-embedding-3-small", "input": text})[0]
        self.assertEqual(len(doc.embedding), len(expected))
        for got, want in zip(doc.embedding, expected, strict=True):
            self.assertAlmostEqual(got, want, places=6)
        self.assertTrue(AppliedResult.objects.filter(request_id=doc.mixbatch_request_id).exists())

        shown = self.client.get(f"/documents/{doc.pk}/").json()
        self.assertEqual(shown["status"], "done")
        self.assertEqual(shown["embedding"], doc.embedding)

    def test_post_classify_fills_the_label(self) -> None:
        text = "Dear Ms Novak, thank you for your letter of 3 May."
        created = self.post({"text": text, "task": "classify", "lane": "urgent"})
        doc = self.wait_done(created["id"])
        self.assertEqual(doc.mixbatch_status, "done", doc.mixbatch_error)
        self.assertEqual(doc.label, expected_reply("/v1/chat/completions", classify(text)["body"]))
        self.assertIsNone(doc.embedding)

    def test_rolled_back_transaction_enqueues_nothing(self) -> None:
        client = get_client()
        text = "This row is rolled back."
        with self.assertRaises(RuntimeError), transaction.atomic():
            doc = Document.objects.create(text=text)
            pending = enqueue(doc, "embedding", lane="bulk", **embed(text))
            raise RuntimeError("something after enqueue failed")
        self.assertFalse(pending.submitted)
        self.assertIsNone(pending.id)
        self.assertFalse(Document.objects.filter(text=text).exists())
        key = client.store.keys.idempotency(client.tenant, pending.custom_id)
        self.assertEqual(client.store.redis.exists(key), 0, "no request has that custom_id")
        stats = client.store.lane_stats("bulk")
        self.assertEqual((stats.depth, stats.leased, sum(stats.counts.values())), (0, 0, 0))

    def test_view_rolls_back_row_and_request_on_a_bad_request(self) -> None:
        before = Document.objects.count()
        response = self.client.post(
            "/documents/", {"text": "x", "lane": "no-such-lane"}, content_type="application/json"
        )
        self.assertEqual(response.status_code, 400)
        self.assertIn("no-such-lane", response.json()["error"])
        self.assertEqual(Document.objects.count(), before)

    def test_failed_request_records_the_error(self) -> None:
        doc = Document.objects.create(text="bad dimensions")
        body = {"model": "text-embedding-3-small", "input": doc.text, "dimensions": 0}
        enqueue(doc, "embedding", endpoint="/v1/embeddings", body=body)  # autocommit: now
        doc = self.wait_done(doc.pk)
        self.assertEqual(doc.mixbatch_status, "failed")
        self.assertIn("dimensions", doc.mixbatch_error)
        self.assertIsNone(doc.embedding)

    def test_duplicate_delivery_through_the_worker_changes_nothing(self) -> None:
        doc = Document.objects.create(text="delivered twice")
        enqueue(doc, "embedding", **embed(doc.text))
        doc = self.wait_done(doc.pk)
        payload = get_client().result(doc.mixbatch_request_id, timeout=5).model_dump(mode="json")
        # The app changes the row after the answer arrived; a late duplicate must not undo it.
        Document.objects.filter(pk=doc.pk).update(embedding=[1.0])
        for _ in range(2):
            self.producer.send_task(TASK, args=[payload], queue=CALLBACK_QUEUE)
        # A fresh request sent after the duplicates; the single worker process takes messages
        # in order, so once its row is filled the duplicates have been handled.
        probe = Document.objects.create(text="probe")
        enqueue(probe, "embedding", **embed(probe.text))
        self.wait_done(probe.pk)
        self.assertEqual(Document.objects.get(pk=doc.pk).embedding, [1.0])
        self.assertEqual(AppliedResult.objects.filter(request_id=payload["id"]).count(), 1)

    def test_the_same_question_again_gets_the_stored_answer_at_once(self) -> None:
        text = "asked twice"
        doc = Document.objects.create(text=text)
        enqueue(doc, "embedding", **embed(text))
        first = self.wait_done(doc.pk)
        # What a recreated database holds: a row with the same primary key asking the same
        # question, unanswered, and no record of the delivery. mixbatch returns the first
        # request, whose answer went out long ago; enqueue applies the stored result itself.
        AppliedResult.objects.all().delete()
        Document.objects.filter(pk=doc.pk).update(
            embedding=None, mixbatch_status="queued", mixbatch_request_id=""
        )
        again = enqueue(doc, "embedding", **embed(text))  # no atomic block: submitted now
        assert again.ticket is not None
        self.assertTrue(again.ticket.duplicate)
        self.assertEqual(again.id, first.mixbatch_request_id)
        doc.refresh_from_db()
        self.assertEqual((doc.mixbatch_status, doc.embedding), ("done", first.embedding))

        # A changed question for the same row is a new request, answered in its turn.
        changed = enqueue(doc, "embedding", **embed("asked differently"))
        assert changed.ticket is not None
        self.assertFalse(changed.ticket.duplicate)
        wait_for(
            lambda: Document.objects.get(pk=doc.pk).mixbatch_request_id == changed.id,
            45,
            "the changed question's answer",
        )
        want = expected_embeddings(
            {"model": "text-embedding-3-small", "input": "asked differently"}
        )
        self.assertEqual(len(Document.objects.get(pk=doc.pk).embedding), len(want[0]))


class ApplyResultOnce(TransactionTestCase):
    """``apply_result`` without a worker: the exactly-once rule and a custom writer."""

    def result_for(self, doc: Document, *, status: State = State.DONE) -> dict[str, Any]:
        now = time.time()
        return Result(
            id=f"standard.{uuid.uuid4().hex[:20].upper()}",
            custom_id=target_for(doc, "label").custom_id,
            lane="standard",
            status=status,
            body={"choices": [{"message": {"role": "assistant", "content": " Invoice "}}]},
            deadline=now + 60,
            created_at=now,
            finished_at=now,
        ).model_dump(mode="json")

    def test_second_delivery_is_a_no_op(self) -> None:
        doc = Document.objects.create(text="t", task="classify")
        result = self.result_for(doc)
        writes: list[str] = []

        def normalise(row: Document, answer: Answer) -> None:
            writes.append(answer.request_id)
            write_answer(row, replace(answer, value=answer.value.strip().lower()))

        self.assertTrue(apply_result(result, write=normalise))
        self.assertFalse(apply_result(result, write=normalise))
        self.assertEqual(writes, [result["id"]])
        doc.refresh_from_db()
        self.assertEqual((doc.label, doc.mixbatch_status), ("invoice", "done"))
        self.assertEqual(doc.mixbatch_request_id, result["id"])

    def test_a_deleted_row_is_skipped(self) -> None:
        doc = Document.objects.create(text="t")
        result = self.result_for(doc)
        doc.delete()
        self.assertFalse(apply_result(result))
        self.assertFalse(apply_result(result))
