"""The Celery app: ``celery -A config worker`` and ``celery -A config beat`` find it here."""

from __future__ import annotations

import logging

from celery import Celery, signals

from config.logging import setup_logging
from config.settings import get_settings

app = Celery(
    "mixbatch",
    task_cls="config.redaction:MixbatchTask",
    include=[
        "tasks.aggregate",
        "tasks.realtime",
        "tasks.batch",
        "tasks.gpu",
        "tasks.deliver",
        "tasks.sweep",
        "tasks.enqueue",
        "tasks.cli.metrics",
    ],
)
app.config_from_object("config.celeryconfig")


@signals.setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: object) -> None:
    """Our structured format in workers and beat, instead of Celery's own."""
    s = get_settings()
    level = (
        logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or s.log_level)
    )
    setup_logging(str(level), s.log_format)
