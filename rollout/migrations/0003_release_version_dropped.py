"""Release.version dropped: bumped on changes but read by nothing. The proxy's snapshot
knows a change from the audit row every change writes (access.snapshot)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("rollout", "0002_reviews_approvals_incidents"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="release",
            name="version",
        ),
    ]
