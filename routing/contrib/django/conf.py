"""``settings.MIXBATCH``: one dict, checked at start-up, so a typo fails early, naming the key.

    MIXBATCH = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",  # the service's Redis; default $MIXBATCH_REDIS_URL
        "NAMESPACE": "mb",                        # the service's MIXBATCH_NAMESPACE
        "TENANT": "default",                      # whose requests these are (custom_id scope)
        "LANE": "standard",                       # default lane of enqueue()
        "CALLBACK_TASK": "mixbatch_django.store_answer",
        "CALLBACK_QUEUE": "mixbatch_answers",     # the queue your Celery worker consumes
    }

Every key is optional; None or "" (an unset environment variable) means the default.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from routing.contrib.common import (
    DEFAULT_CALLBACK_QUEUE,
    SETTING_NAMES,
    IntegrationSettings,
    settings_from,
)

__all__ = ["DEFAULT_CALLBACK_QUEUE", "DEFAULT_CALLBACK_TASK", "load_settings"]

DEFAULT_CALLBACK_TASK = "mixbatch_django.store_answer"


def load_settings() -> IntegrationSettings:
    """Read and check ``settings.MIXBATCH``; ``ImproperlyConfigured`` names the bad key."""
    raw = getattr(settings, "MIXBATCH", None) or {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"settings.MIXBATCH must be a dict, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SETTING_NAMES))
    if unknown:
        raise ImproperlyConfigured(
            f"settings.MIXBATCH has unknown keys {unknown} (known: {', '.join(SETTING_NAMES)})"
        )
    try:
        return settings_from(
            raw, default_task=DEFAULT_CALLBACK_TASK, where=lambda k: f"settings.MIXBATCH[{k!r}]"
        )
    except TypeError as exc:
        raise ImproperlyConfigured(str(exc)) from None
