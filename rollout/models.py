from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from stagegate.ids import new_plan_id, new_release_id, new_transition_id


class ReleaseState(models.TextChoices):
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"
    RETIRED = "retired", "Retired"


class Release(models.Model):
    """One model being rolled out. Its plan and upstream come from the active
    ``RolloutPlan``; ``current_stage`` names a stage of that plan."""

    public_id = models.CharField(max_length=24, unique=True, default=new_release_id, editable=False)
    name = models.SlugField(max_length=63, unique=True, help_text="The model name clients call.")
    description = models.TextField(blank=True)
    upstream_base_url = models.URLField(max_length=500)
    upstream_model = models.CharField(max_length=200)
    current_stage = models.CharField(max_length=40)
    state = models.CharField(
        max_length=16, choices=ReleaseState.choices, default=ReleaseState.ACTIVE
    )
    active_plan = models.ForeignKey(
        "RolloutPlan", null=True, on_delete=models.PROTECT, related_name="+"
    )
    stage_entered_at = models.DateTimeField()
    # Bumped on every change that affects access, so caches can tell a stale copy.
    version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class RolloutPlan(models.Model):
    """An immutable version of a release's rollout plan document.

    ``document`` is the canonical, validated form (``rollout.plan_schema``);
    ``source`` is the text as it was applied. Rows are never updated.
    """

    public_id = models.CharField(max_length=24, unique=True, default=new_plan_id, editable=False)
    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="plans")
    version = models.PositiveIntegerField()
    document = models.JSONField()
    source = models.TextField()
    digest = models.CharField(max_length=64)
    comment = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["release_id", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["release", "version"], name="one_plan_per_version")
        ]

    def __str__(self) -> str:
        return f"{self.release} v{self.version}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError("Rollout plan versions are immutable; apply a new version.")
        super().save(*args, **kwargs)


class TransitionKind(models.TextChoices):
    CREATE = "create", "Created"
    ADVANCE = "advance", "Advance"
    ROLLBACK = "rollback", "Roll back"
    PAUSE = "pause", "Pause"
    RESUME = "resume", "Resume"


class StageTransition(models.Model):
    """A change of a release's stage or state. Every one is audited as well."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_transition_id, editable=False
    )
    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="transitions")
    kind = models.CharField(max_length=16, choices=TransitionKind.choices)
    from_stage = models.CharField(max_length=40, blank=True)
    to_stage = models.CharField(max_length=40)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, choices=ReleaseState.choices)
    plan = models.ForeignKey(RolloutPlan, on_delete=models.PROTECT, related_name="+")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.release} {self.kind} {self.from_stage}→{self.to_stage}"
