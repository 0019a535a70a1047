"""Usage events: small integer codes for the words every row repeats, and the columns
a replay of the decision needs.

tier, endpoint, decision, reason and error become smallint codes
(``monitoring.records``; the ORM still reads and filters them as words); plan_version,
max_tokens, claimed_tier and verifications are added, NULL on the rows already there
(they were not recorded). Existing rows are converted by ONE UPDATE over the table:
cheap on a small database, a full rewrite of a big one (docs/operations.md, "Usage
events": what it costs and how to avoid it). Reversible.

The codes are taken from ``monitoring.records``: a word keeps its code for ever, so the
tables of any later build convert the rows this migration finds the same way.
"""

from django.db import migrations, models
from django.db.models import Case, Value, When

import monitoring.records
from monitoring.records import ENDPOINTS, ERRORS, REASONS, TIERS, VERDICTS

# column -> its code table; each is added as <column>_code, filled, then renamed.
CODED = {
    "tier": TIERS,
    "endpoint": ENDPOINTS,
    "decision": VERDICTS,
    "reason": REASONS,
    "error": ERRORS,
}


def _to_codes(column, table):
    whens = [When(**{column: word}, then=Value(code)) for code, word in table.words.items()]
    # A word no table had (none is known to have been written) keeps a code that reads
    # back as "<column>:0" (or the table's "other") rather than failing the migration.
    default = table.fallback if table.fallback is not None else 0
    return Case(*whens, default=Value(default), output_field=models.SmallIntegerField())


def _to_words(column, table):
    whens = [When(**{column: code}, then=Value(word)) for code, word in table.words.items()]
    return Case(*whens, default=Value(""), output_field=models.CharField())


def encode(apps, schema_editor):
    UsageEvent = apps.get_model("monitoring", "UsageEvent")
    UsageEvent.objects.update(
        **{f"{column}_code": _to_codes(column, table) for column, table in CODED.items()}
    )


def decode(apps, schema_editor):
    UsageEvent = apps.get_model("monitoring", "UsageEvent")
    UsageEvent.objects.update(
        **{column: _to_words(f"{column}_code", table) for column, table in CODED.items()}
    )


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0006_usage_rollup_key"),
    ]

    operations = [
        *(
            migrations.AddField(
                model_name="usageevent",
                name=f"{column}_code",
                field=models.SmallIntegerField(default=0),
            )
            for column in CODED
        ),
        migrations.RunPython(encode, decode, elidable=False),
        # Removed with a default, so that migrating back can add them to filled tables
        # before ``decode`` writes them.
        *(
            migrations.AlterField(
                model_name="usageevent",
                name=column,
                field=models.CharField(max_length=length, blank=True, default=""),
            )
            for column, length in (("endpoint", 32), ("decision", 8), ("reason", 32))
        ),
        *(migrations.RemoveField(model_name="usageevent", name=column) for column in CODED),
        *(
            migrations.RenameField(
                model_name="usageevent", old_name=f"{column}_code", new_name=column
            )
            for column in CODED
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="tier",
            field=monitoring.records.CodeField(
                blank=True, default="", help_text="Effective tier.", table="tier"
            ),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="endpoint",
            field=monitoring.records.CodeField(table="endpoint"),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="decision",
            field=monitoring.records.CodeField(help_text="allow or deny", table="decision"),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="reason",
            field=monitoring.records.CodeField(
                help_text="Decision reason code, or ok.", table="reason"
            ),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="error",
            field=monitoring.records.CodeField(
                blank=True, default="", help_text="upstream_error, ...", table="error"
            ),
        ),
        migrations.AlterField(
            model_name="usageevent",
            name="streamed",
            field=models.BooleanField(default=False, help_text="The client asked for a stream."),
        ),
        migrations.AddField(
            model_name="usageevent",
            name="plan_version",
            field=models.PositiveIntegerField(
                blank=True, null=True, help_text="Version of the release's plan the decision read."
            ),
        ),
        migrations.AddField(
            model_name="usageevent",
            name="max_tokens",
            field=models.PositiveIntegerField(
                blank=True, null=True, help_text="max_tokens asked for; blank if absent."
            ),
        ),
        migrations.AddField(
            model_name="usageevent",
            name="claimed_tier",
            field=monitoring.records.CodeField(
                blank=True, null=True, help_text="The organization's own tier.", table="tier"
            ),
        ),
        migrations.AddField(
            model_name="usageevent",
            name="verifications",
            field=monitoring.records.KindsField(
                blank=True, null=True, help_text="Kinds of valid, unexpired verifications held."
            ),
        ),
    ]
