"""``AppliedResult``: the request ids whose answers were written, for an exactly-once effect.

mixbatch delivers a result at least once (a retried delivery, a redelivered Celery message), so
the callback needs to tell a first delivery from a repeat. It inserts the request id here in the
same transaction that writes the row; the primary key makes the second insert fail, and the
second delivery then changes nothing. Rows can be deleted once no redelivery can come (say,
after ``MIXBATCH_RESULT_TTL_S``, 7 days by default); a result delivered after that is applied
again, which the default writer's overwrite makes harmless.
"""

from __future__ import annotations

from django.db import models


class AppliedResult(models.Model):
    request_id = models.CharField(max_length=128, primary_key=True)
    custom_id = models.CharField(max_length=512, blank=True)
    status = models.CharField(max_length=16)
    applied_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        db_table = "mixbatch_applied_result"
        verbose_name = "applied mixbatch result"

    def __str__(self) -> str:
        return f"{self.request_id} ({self.status})"
