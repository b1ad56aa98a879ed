"""The Django app: add ``"routing.contrib.django"`` to ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig
from django.core.signals import setting_changed


def _on_setting_changed(*, setting: str, **_: object) -> None:
    if setting == "MIXBATCH":
        from routing.contrib.django.core import reset

        reset()


class MixbatchConfig(AppConfig):
    """Label ``mixbatch``: its one table is ``mixbatch_applied_result``."""

    name = "routing.contrib.django"
    label = "mixbatch"
    verbose_name = "mixbatch"

    def ready(self) -> None:
        from routing.contrib.django.conf import load_settings

        load_settings()  # a typo in settings.MIXBATCH stops start-up, naming the key
        setting_changed.connect(_on_setting_changed, dispatch_uid="routing.contrib.django")
