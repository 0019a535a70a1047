"""ApiKey.version dropped: bumped on changes but read by nothing. The proxy's snapshot
knows a change from the audit row every change writes (access.snapshot)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("access", "0003_organization_slug_lower_case"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="apikey",
            name="version",
        ),
    ]
