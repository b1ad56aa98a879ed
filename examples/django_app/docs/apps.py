from django.apps import AppConfig


class DocsConfig(AppConfig):
    name = "docs"
    default_auto_field = "django.db.models.BigAutoField"
