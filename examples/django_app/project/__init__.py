"""The example project. Importing the Celery app here makes ``shared_task`` bind to it."""

from project.celery import app as celery_app

__all__ = ["celery_app"]
