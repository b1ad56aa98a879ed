"""The example Flask app: POST a document, and mixbatch fills in its embedding or label.

    flask --app flask_docs run                                # the web app, on port 5000
    celery -A make_celery worker -Q flask_docs.callbacks      # writes answers into the database
    celery -A make_celery beat                                # the app's own recurring jobs

The environment says where things are, so the same code serves the web app, the worker and the
tests: ``MIXBATCH_REDIS_URL`` (the service's Redis, also the Celery broker unless
``MIXBATCH_BROKER_URL`` names the service's own),
``MIXBATCH_NAMESPACE`` (default "mb") and ``FLASK_DOCS_DATABASE_URL`` (a SQLAlchemy URL,
default ``db.sqlite3`` beside this package). ``FLASK_DOCS_DIGEST_EVERY_S`` runs the daily digest
every so many seconds instead of at 06:00 UTC (the tests use it).
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task
from celery.schedules import crontab
from flask import Flask

from flask_docs.db import metadata, mixbatch
from flask_docs.requests import digest_requests
from routing.contrib.common import celery_broker, enqueue_many_entry

DEFAULT_DATABASE = Path(__file__).resolve().parent.parent / "db.sqlite3"


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        DATABASE_URL=os.environ.get("FLASK_DOCS_DATABASE_URL", f"sqlite:///{DEFAULT_DATABASE}"),
        MIXBATCH_REDIS_URL=os.environ.get("MIXBATCH_REDIS_URL"),
        MIXBATCH_NAMESPACE=os.environ.get("MIXBATCH_NAMESPACE"),
        MIXBATCH_LANE="standard",
        MIXBATCH_CALLBACK_QUEUE="flask_docs.callbacks",
    )
    app.config.update(config or {})

    url = sa.make_url(app.config["DATABASE_URL"])
    # The web app and the worker write the same SQLite file: wait for each other's locks.
    connect_args = {"timeout": 20} if url.get_backend_name() == "sqlite" else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    metadata.create_all(engine)  # the documents table and mixbatch_applied
    mixbatch.init_app(app, engine=engine)
    celery_init_app(app)

    from flask_docs.views import bp

    app.register_blueprint(bp)
    return app


def celery_init_app(app: Flask) -> Celery:
    """Flask's documented Celery pattern, plus mixbatch's ready callback task.

    The broker is the mixbatch service's (``celery_broker``: ``MIXBATCH_BROKER_URL``, else its
    Redis): the service delivers each result by sending ``mixbatch_flask.store_answer`` to the
    ``flask_docs.callbacks`` queue there.
    """

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    broker, transport_options = celery_broker(app.config["MIXBATCH_REDIS_URL"])
    celery_app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        accept_content=["json"],
        timezone="UTC",
        # The app's own beat enqueues a recurring job into mixbatch: one message to
        # ``mixbatch.enqueue_many``, which the service's worker takes from its control queue.
        beat_schedule={"daily-digest": enqueue_many_entry(digest_requests(), _digest_schedule())},
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    mixbatch.callback_task(celery_app, app=app)
    return celery_app


def _digest_schedule() -> float | crontab:
    every = os.environ.get("FLASK_DOCS_DIGEST_EVERY_S")
    return float(every) if every else crontab(hour=6, minute=0)
