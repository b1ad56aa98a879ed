"""The nightly job, stored where django-celery-beat's database scheduler reads it.

``migrate`` creates it: a PeriodicTask that sends ``docs.requests.nightly_requests()`` to
mixbatch's ``mixbatch.enqueue_many`` task at 02:00 UTC. Change its time, pause it or run it now
in the admin (or the shell); ``celery -A project beat -S django`` picks up the change.
"""

import json

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

from docs.requests import NIGHTLY_JOB, nightly_requests
from routing.contrib.common import ENQUEUE_MANY_TASK, enqueue_many_options


def create_nightly_job(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    crontab_model = apps.get_model("django_celery_beat", "CrontabSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    nightly, _ = crontab_model.objects.get_or_create(
        minute="0",
        hour="2",
        day_of_week="*",
        day_of_month="*",
        month_of_year="*",
        timezone="UTC",
    )
    opts = enqueue_many_options(nightly_requests())
    task_model.objects.update_or_create(
        name=NIGHTLY_JOB,
        defaults={
            "task": ENQUEUE_MANY_TASK,
            "crontab": nightly,
            "args": json.dumps(opts["args"]),
            "queue": opts["queue"],
            # Celery's default argsrepr is the whole list of bodies, shown in the message's
            # headers and in Flower; the count goes there instead.
            "headers": json.dumps({"argsrepr": opts["argsrepr"], "kwargsrepr": "{}"}),
            "description": "The nightly digest, answered through mixbatch (docs/django.md).",
        },
    )


def delete_nightly_job(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NIGHTLY_JOB).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("docs", "0001_initial"),
        ("django_celery_beat", "0016_alter_crontabschedule_timezone"),
    ]

    operations = [migrations.RunPython(create_nightly_job, delete_nightly_job)]
