"""The worker's entry point: ``celery -A make_celery worker -Q flask_docs.callbacks``.

It builds the app, so the callback task runs with the app's config and database.
"""

from flask_docs import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
