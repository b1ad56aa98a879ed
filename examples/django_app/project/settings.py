"""Settings of the example project: SQLite, the ``docs`` app, the mixbatch integration and
django-celery-beat (the nightly job's schedule lives in the database).

The environment says where things are, so the same settings serve ``runserver``, the Celery
worker and the tests:

    MIXBATCH_REDIS_URL     the mixbatch service's Redis (lanes and the Celery broker)
    MIXBATCH_BROKER_URL    the service's own Celery broker, when it has one (a cluster store)
    MIXBATCH_NAMESPACE     the service's key prefix, default "mb"
    DOCS_DATABASE          the SQLite file, default db.sqlite3 here
    DOCS_TEST_DATABASE     the test database's file (a file, not memory: the worker shares it)
"""

import os
from pathlib import Path

from routing.contrib.common import celery_broker

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django_celery_beat",  # the nightly job, stored in the database (docs/migrations/0002)
    "routing.contrib.django",  # enqueue(), the store_answer task, the AppliedResult table
    "docs",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DOCS_DATABASE", str(BASE_DIR / "db.sqlite3")),
        # The web process and the worker write the same file: wait for each other's locks.
        "OPTIONS": {"timeout": 20},
        "TEST": {"NAME": os.environ.get("DOCS_TEST_DATABASE", str(BASE_DIR / "test_db.sqlite3"))},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# mixbatch: where the service is, and the queue its answers come back on.
MIXBATCH = {
    "REDIS_URL": os.environ.get("MIXBATCH_REDIS_URL"),
    "NAMESPACE": os.environ.get("MIXBATCH_NAMESPACE", "mb"),
    "LANE": "standard",
    "CALLBACK_QUEUE": "docs.callbacks",
}

# Celery (the worker that writes answers back) talks to the service's broker: its own
# MIXBATCH_BROKER_URL, else the same Redis (a Sentinel store through Celery's sentinel://).
CELERY_BROKER_URL, CELERY_BROKER_TRANSPORT_OPTIONS = celery_broker(MIXBATCH["REDIS_URL"])
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# The app's own beat reads its jobs from the database (django-celery-beat's PeriodicTask):
# ``celery -A project beat -S django``; this makes plain ``celery -A project beat`` do the same.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"routing.contrib": {"handlers": ["console"], "level": "INFO"}},
}
