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
