"""Rollup rows keyed by the decision's reason as well, so refusals can be split by why.

Existing rows get ``reason = ""``: each still holds its whole bucket (every reason),
so every total read from them is unchanged, and the old key being unique, the new
one is too. Nothing is recomputed here (a migration must not scan the usage table).
The next rollup of a range replaces its "" rows: ``rollup_window`` deletes the
minute rows of the range that no event matches (no event has reason "") and
recomputes the hours it touches from their minutes, so nothing is counted twice.
Older ranges keep their "" rows until rolled up again (``rollup_window(start, end)``);
the release page shows their refusals as "reason not recorded".

On PostgreSQL the column is added without a table rewrite (a constant default); the
new unique index is built under a lock that blocks rollup writes while it builds.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0004_usage_rollups"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="usagerollup",
            name="usage_rollup_bucket_key",
        ),
        migrations.AddField(
            model_name="usagerollup",
            name="reason",
            field=models.CharField(
                blank=True,
                default="",
                help_text="Decision reason code, ok if allowed.",
                max_length=32,
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
                ),
                name="usage_rollup_bucket_reason_key",
            ),
        ),
    ]
