"""What the app asks mixbatch for each kind of task: the endpoint, the body and the field the
answer goes into. Bodies are exactly what the provider's own API takes."""

from typing import Any

EMBEDDING_MODEL = "text-embedding-3-small"
CLASSIFIER_MODEL = "gpt-4o-mini"
LABELS = ("invoice", "contract", "letter", "other")


def embed(text: str) -> dict[str, Any]:
    return {
        "endpoint": "/v1/embeddings",
        "body": {"model": EMBEDDING_MODEL, "input": text},
    }


def classify(text: str) -> dict[str, Any]:
    return {
        "endpoint": "/v1/chat/completions",
        "body": {
            "model": CLASSIFIER_MODEL,
            "messages": [
                {
                    "role": "system",
                    "content": "Classify the document as one of: "
                    + ", ".join(LABELS)
                    + ". Answer with the label only.",
                },
                {"role": "user", "content": text},
            ],
            "max_tokens": 5,
        },
    }


#: task -> (the field the answer is written into, the request to make)
TASKS = {"embed": ("embedding", embed), "classify": ("label", classify)}


#: The PeriodicTask the nightly job is stored as (``docs/migrations/0002_nightly_digest.py``).
NIGHTLY_JOB = "nightly-digest"


def summarise(label: str) -> dict[str, Any]:
    prompt = f"Summarise today's {label} documents."
    body = {"model": CLASSIFIER_MODEL, "messages": [{"role": "user", "content": prompt}]}
    return {"endpoint": "/v1/chat/completions", "body": body | {"max_tokens": 200}}


def nightly_requests(lane: str = "bulk") -> list[dict[str, Any]]:
    """What the nightly job asks mixbatch for, sent to ``mixbatch.enqueue_many`` by the app's beat
    (django-celery-beat's database scheduler). The bulk lane: a day's deadline, so mixbatch is
    free to run it through a provider's batch API at about half price. No custom_id, so each
    night's run is a new request rather than the first night's answer again."""
    job = {"job": NIGHTLY_JOB}
    return [{"lane": lane, **summarise(x), "metadata": job | {"label": x}} for x in LABELS]
