"""A document, and the answers mixbatch writes into it.

``embedding`` and ``label`` are the targets of the two kinds of request; the ``mixbatch_*``
fields are optional bookkeeping that ``routing.contrib.django.write_answer`` fills when a model
has them (the outcome, the request id to look it up with, and the error of a failed request).
"""

from django.db import models


class Document(models.Model):
    class Task(models.TextChoices):
        EMBED = "embed"
        CLASSIFY = "classify"

    text = models.TextField()
    task = models.CharField(max_length=16, choices=Task.choices, default=Task.EMBED)
    embedding = models.JSONField(null=True, blank=True)
    label = models.CharField(max_length=200, blank=True)
    mixbatch_status = models.CharField(max_length=16, default="queued")
    mixbatch_request_id = models.CharField(max_length=128, blank=True)
    mixbatch_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Document {self.pk} ({self.task}, {self.mixbatch_status})"

    def as_json(self) -> dict:
        return {
            "id": self.pk,
            "text": self.text,
            "task": self.task,
            "embedding": self.embedding,
            "label": self.label,
            "status": self.mixbatch_status,
            "request_id": self.mixbatch_request_id,
            "error": self.mixbatch_error,
        }
