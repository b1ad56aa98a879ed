"""The ``mixbatch_applied_result`` table (``routing.contrib.django.models.AppliedResult``)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="AppliedResult",
            fields=[
                (
                    "request_id",
                    models.CharField(max_length=128, primary_key=True, serialize=False),
                ),
                ("custom_id", models.CharField(blank=True, max_length=512)),
                ("status", models.CharField(max_length=16)),
                ("applied_at", models.DateTimeField(auto_now_add=True, db_index=True)),
            ],
            options={
                "verbose_name": "applied mixbatch result",
                "db_table": "mixbatch_applied_result",
            },
        ),
    ]
