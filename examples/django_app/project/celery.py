"""The project's own Celery app: its worker writes mixbatch's answers into the database.

    celery -A project worker -Q docs.callbacks -l INFO

It must use the same Redis as the mixbatch service (``CELERY_BROKER_URL`` in the settings),
because the service delivers each result by sending ``mixbatch_django.store_answer`` to the
``docs.callbacks`` queue there; ``autodiscover_tasks`` finds that task in the
``routing.contrib.django`` app.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
