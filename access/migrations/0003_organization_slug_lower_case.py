"""Organization slugs become lower case, as rollout plans name them.

Upper-case slugs were accepted before, but a plan's ``allow_orgs`` and ``deny_orgs``
could never name them. Each one is lower-cased here, audited as ``org.updated`` by
``system:migration``, unless two slugs differ only in case: then the migration stops
and names them, and an operator decides which organization keeps the name.
"""

from django.db import migrations, models
from django.db.models.functions import Lower

import access.models

ACTOR = "system:migration"


class SlugCollision(RuntimeError):
    pass


def lower_case_slugs(apps, schema_editor):
    # The real audit writer, not a historical model: the row must join the hash chain
    # exactly as every other change does. It only runs when there is something to change.
    from monitoring import audit

    Organization = apps.get_model("access", "Organization")
    by_lower: dict[str, list[str]] = {}
    for slug in Organization.objects.values_list("slug", flat=True):
        by_lower.setdefault(slug.lower(), []).append(slug)
    collisions = sorted(sorted(slugs) for slugs in by_lower.values() if len(slugs) > 1)
    if collisions:
        named = "; ".join(" and ".join(repr(slug) for slug in slugs) for slugs in collisions)
        raise SlugCollision(
            f"cannot lower-case organization slugs: {named} differ only in case. Rename all but"
            " one of each (for example with the Django shell), update the rollout plans that"
            " name them, and run the migration again."
        )
    for organization in Organization.objects.exclude(slug=Lower("slug")).order_by("pk"):
        old, new = organization.slug, organization.slug.lower()
        organization.slug = new
        organization.save(update_fields=["slug", "updated_at"])
        audit.record(
            "org.updated",
            actor=ACTOR,
            object_type="organization",
            object_id=organization.public_id,
            data={"slug": new, "changes": {"slug": {"from": old, "to": new}}},
        )


class Migration(migrations.Migration):
    dependencies = [
        ("access", "0002_role_groups"),
        ("monitoring", "0004_usage_rollups"),
    ]

    operations = [
        migrations.RunPython(lower_case_slugs, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="organization",
            name="slug",
            field=models.SlugField(
                help_text="lower-case letters, digits, hyphens and underscores, starting with"
                " a letter or digit",
                max_length=63,
                unique=True,
                validators=[access.models.validate_org_slug],
            ),
        ),
        migrations.AddConstraint(
            model_name="organization",
            constraint=models.CheckConstraint(
                condition=models.Q(slug=Lower("slug")), name="organization_slug_lower_case"
            ),
        ),
    ]
