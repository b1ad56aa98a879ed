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


def digest_requests(lane: str = "standard") -> list[dict[str, Any]]:
    """The daily digest the app's beat asks for (``mixbatch.enqueue_many``); fixed when beat
    reads its schedule. A job built from the day's rows would be a task of the app's own that
    calls ``routing.contrib.common.send_enqueue_many``."""
    return [
        {
            "lane": lane,
            "endpoint": "/v1/chat/completions",
            "body": {
                "model": CLASSIFIER_MODEL,
                "messages": [{"role": "user", "content": f"Write the {topic} digest."}],
                "max_tokens": 200,
            },
            "metadata": {"job": "daily-digest", "topic": topic},
        }
        for topic in ("invoices", "contracts")
    ]
