"""Rollup rows keyed by the API key as well, so the console can draw each key's usage.

``key`` is the usage event's key (the API key's public id; "" for a call without a
valid key). Existing rows get ``key = ""``: each still holds its whole bucket (every
key), so every total read from them is unchanged, and the old key being unique, the
new one is too. Nothing is recomputed here (a migration must not scan the usage
table). The next rollup of a range replaces them: ``rollup_window`` deletes the minute
rows of the range that no event matches and overwrites the rest (a "" row that keyless
events still match is overwritten with their counts only, the keyed events getting
rows of their own), then recomputes the hours it touches from their minutes, so
nothing is counted twice. Older ranges keep their "" rows until rolled up again
(``rollup_window(start, end)``); until then the key pages draw no traffic for them.

On PostgreSQL the column is added without a table rewrite (a constant default); the
new unique index is built under a lock that blocks rollup writes while it builds.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0005_usage_rollup_reason"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="usagerollup",
            name="usage_rollup_bucket_reason_key",
        ),
        migrations.AddField(
            model_name="usagerollup",
            name="key",
            field=models.CharField(
                blank=True,
                default="",
                help_text="API key public id, blank without a valid key.",
                max_length=24,
            ),
        ),
        migrations.AddConstraint(
            model_name="usagerollup",
            constraint=models.UniqueConstraint(
                fields=(
                    "bucket_seconds",
                    "bucket_start",
                    "release",
                    "stage",
                    "tier",
                    "org",
                    "reason",
                    "key",
                ),
                name="usage_rollup_bucket_reason_key_key",
            ),
        ),
    ]
