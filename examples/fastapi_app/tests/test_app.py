"""The example end to end through FastAPI's TestClient: a real mixbatch, a real worker.

A test posts a job, mixbatch runs it against the sandbox provider, and the GET awaits the
answer (the app's ``AsyncClient`` waits on the request's notify list, no thread held).
"""

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fastapi_jobs import CHAT_MODEL, EMBEDDING_MODEL, summarise

from routing.sandbox import expected_embeddings, expected_reply
from tasks.cli.stack import LocalStack


def submit(client: TestClient, job: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/jobs", json=job)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture
def slow(stack: LocalStack) -> Iterator[None]:
    """The sandbox answers after three seconds while the test runs."""
    stack.sandbox.configure(latency_ms=3000)
    try:
        yield
    finally:
        stack.sandbox.configure(latency_ms=5)


def test_a_summary_is_awaited(client: TestClient) -> None:
    text = "Invoice 2024-117: 3 hours of consulting, 450 EUR."
    ticket = submit(client, {"text": text, "task": "summarise", "lane": "urgent"})
    assert ticket["id"].startswith("urgent.") and ticket["duplicate"] is False

    done = client.get(f"/jobs/{ticket['id']}", params={"wait": 30})
    assert done.status_code == 200, done.text
    job = done.json()
    assert (job["status"], job["route"], job["error"]) == ("done", "realtime", None)
    assert job["answer"] == expected_reply("/v1/chat/completions", summarise(text)["body"])


def test_an_embedding_is_awaited_and_a_custom_id_is_one_job(client: TestClient) -> None:
    job = {"text": "a corpus line", "task": "embed", "custom_id": "line-1"}
    first, again = submit(client, job), submit(client, job)
    assert (again["id"], again["duplicate"]) == (first["id"], True)
    done = client.get(f"/jobs/{first['id']}", params={"wait": 30}).json()
    want = expected_embeddings({"model": EMBEDDING_MODEL, "input": "a corpus line"})[0]
    assert done["answer"] == pytest.approx(want, abs=1e-6)


def test_waits_run_side_by_side(client: TestClient) -> None:
    """Several GETs wait at once on the app's one event loop; each gets its own answer."""
    texts = [f"ticket {i}" for i in range(4)]
    ids = [submit(client, {"text": t, "lane": "urgent"})["id"] for t in texts]
    answers: dict[str, Any] = {}

    def wait(job_id: str) -> None:
        answers[job_id] = client.get(f"/jobs/{job_id}", params={"wait": 30}).json()["answer"]

    threads = [threading.Thread(target=wait, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job_id, text in zip(ids, texts, strict=True):
        assert answers[job_id] == expected_reply("/v1/chat/completions", summarise(text)["body"])


def test_a_job_still_running_is_202_and_can_be_cancelled(client: TestClient, slow: None) -> None:
    ticket = submit(client, {"text": "slow one", "lane": "urgent"})
    waiting = client.get(f"/jobs/{ticket['id']}", params={"wait": 0.5})
    assert waiting.status_code == 202
    assert waiting.json()["status"] in {"queued", "claimed", "running"}
    assert client.delete(f"/jobs/{ticket['id']}").json()["status"] == "cancelled"
    done = client.get(f"/jobs/{ticket['id']}", params={"wait": 5}).json()
    assert (done["status"], done["answer"]) == ("cancelled", None)


def test_ask_goes_through_the_openai_drop_in(client: TestClient) -> None:
    response = client.post("/ask", json={"question": "What is mixbatch?"})
    assert response.status_code == 200, response.text
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "What is mixbatch?"}]}
    assert response.json()["answer"] == expected_reply("/v1/chat/completions", body)
    assert response.json()["request_id"].startswith("urgent.")


@pytest.mark.parametrize(
    "path,payload,field",
    [
        ("/jobs", {"text": "x", "lane": "fast"}, "lane"),
        ("/ask", {"question": "x", "lane": "fast"}, "lane"),
    ],
)
def test_an_unknown_lane_is_a_400_naming_it(
    client: TestClient, stack: LocalStack, path: str, payload: dict[str, Any], field: str
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 400
    assert f"{field}: unknown lane 'fast'" in response.text


def test_unknown_jobs_and_tasks(client: TestClient) -> None:
    assert client.get("/jobs/urgent.01J0NOTAJOB").status_code == 404
    assert client.delete("/jobs/urgent.01J0NOTAJOB").status_code == 404
    assert client.post("/jobs", json={"text": "x", "task": "paint"}).status_code == 400
