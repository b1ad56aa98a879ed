"""Settings, lanes table and the Celery app (``celery -A config worker``)."""

from config.celery_app import app
from config.settings import Settings, get_settings, reset_settings

__all__ = ["Settings", "app", "get_settings", "reset_settings"]
