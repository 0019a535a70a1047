from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from monitoring.redaction import RedactedCharField, RedactedTextField
from stagegate.ids import (
    new_approval_id,
    new_incident_id,
    new_plan_id,
    new_release_id,
    new_review_id,
    new_transition_id,
)


class ReleaseState(models.TextChoices):
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"
    RETIRED = "retired", "Retired"


class Release(models.Model):
    """One model being rolled out. Its plan and upstream come from the active
    ``RolloutPlan``; ``current_stage`` names a stage of that plan."""

    public_id = models.CharField(max_length=24, unique=True, default=new_release_id, editable=False)
    name = models.SlugField(max_length=63, unique=True, help_text="The model name clients call.")
    description = RedactedTextField(blank=True)
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
    source = RedactedTextField()
    digest = models.CharField(max_length=64)
    comment = RedactedCharField(max_length=300, blank=True)
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
    reason = RedactedTextField(blank=True)
    # The review an advance carried out; at most one advance per review (idempotency).
    review = models.OneToOneField(
        "Review", null=True, blank=True, on_delete=models.PROTECT, related_name="transition"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.release} {self.kind} {self.from_stage}→{self.to_stage}"


class _Immutable(models.Model):
    """Rows written once and never changed: what was decided stays as it was decided."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError(f"{type(self).__name__} rows are immutable.")
        super().save(*args, **kwargs)


class Recommendation(models.TextChoices):
    ADVANCE = "advance", "Advance"
    HOLD = "hold", "Hold"
    ROLLBACK = "rollback", "Roll back"


class ReviewTrigger(models.TextChoices):
    SCHEDULE = "schedule", "Periodic"
    API = "api", "Requested"


class Review(_Immutable):
    """One evaluation of a release's current stage against its plan's exit criteria and
    tripwires, with the telemetry it read and a recommendation. Immutable.

    It is bound to the plan version and the stage stint (``stage_entered_at``) it
    judged: approvals count only while those are still the release's, and only for
    the release's latest review (``rollout.approvals``).
    """

    public_id = models.CharField(max_length=24, unique=True, default=new_review_id, editable=False)
    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="reviews")
    plan = models.ForeignKey(RolloutPlan, on_delete=models.PROTECT, related_name="+")
    stage = models.CharField(max_length=40)
    stage_entered_at = models.DateTimeField()
    next_stage = models.CharField(max_length=40, blank=True)
    recommendation = models.CharField(max_length=16, choices=Recommendation.choices)
    summary = models.CharField(max_length=500)
    criteria = models.JSONField(default=list, help_text="Each exit criterion's result.")
    tripwires = models.JSONField(default=list, help_text="Each tripwire's result.")
    telemetry = models.JSONField(default=dict, help_text="The rolled-up totals read.")
    approvals_needed = models.PositiveSmallIntegerField(default=0)
    trigger = models.CharField(max_length=16, choices=ReviewTrigger.choices)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["release", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.release} {self.stage} {self.recommendation} ({self.public_id})"


class Verdict(models.TextChoices):
    APPROVE = "approve", "Approve"
    REJECT = "reject", "Reject"


class Approval(_Immutable):
    """A reviewer's signed yes or no on one review, naming the plan version and stage
    it saw. Immutable; one per reviewer and review."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_approval_id, editable=False
    )
    review = models.ForeignKey(Review, on_delete=models.PROTECT, related_name="approvals")
    plan = models.ForeignKey(RolloutPlan, on_delete=models.PROTECT, related_name="+")
    stage = models.CharField(max_length=40)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    verdict = models.CharField(max_length=8, choices=Verdict.choices)
    comment = RedactedTextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["review", "reviewer"], name="one_verdict_per_reviewer")
        ]

    def __str__(self) -> str:
        return f"{self.reviewer} {self.verdict} {self.review.public_id}"


class Severity(models.TextChoices):
    LOW = "low", "Low"
    MEDIUM = "medium", "Medium"
    HIGH = "high", "High"
    CRITICAL = "critical", "Critical"


class IncidentStatus(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"


class Incident(models.Model):
    """Something went wrong with a release in a stage. Open incidents at or above the
    plan's severity block leaving the stage, and incident tripwires act on them."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_incident_id, editable=False
    )
    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="incidents")
    stage = models.CharField(max_length=40)
    severity = models.CharField(max_length=16, choices=Severity.choices)
    status = models.CharField(
        max_length=16, choices=IncidentStatus.choices, default=IncidentStatus.OPEN
    )
    title = RedactedCharField(max_length=200)
    description = RedactedTextField(blank=True)
    opened_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolution = RedactedTextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["release", "status"])]

    def __str__(self) -> str:
        return f"{self.release} {self.severity} {self.title}"
