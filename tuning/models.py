"""Fine-tuning under the rollout: training files, jobs, their screening, the tuned models
they make and the assessments and human decisions that gate those models.

A job's rows keep the (release, stage, tier, organization) it was gated under, so the
stage reviews and the console count files, jobs, verdicts and assessments per stage the
way usage is counted (``tuning.telemetry``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from monitoring.redaction import RedactedCharField, RedactedTextField
from stagegate.ids import (
    new_file_id,
    new_job_event_id,
    new_job_id,
    new_tuned_model_id,
    new_tuning_decision_id,
)


class TrainingFile(models.Model):
    """A chat JSONL file uploaded with ``purpose: fine-tune``, validated on upload; only
    its organization sees it."""

    public_id = models.CharField(max_length=40, unique=True, default=new_file_id, editable=False)
    organization = models.ForeignKey(
        "access.Organization", on_delete=models.CASCADE, related_name="training_files"
    )
    api_key = models.ForeignKey(
        "access.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    filename = RedactedCharField(max_length=255)
    purpose = models.CharField(max_length=32, default="fine-tune")
    bytes = models.PositiveBigIntegerField()
    rows = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    content = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["organization", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.public_id} ({self.filename})"


class JobStatus(models.TextChoices):
    VALIDATING_FILES = "validating_files", "Validating files"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class DatasetVerdict(models.TextChoices):
    ACCEPT = "accept", "Accept"
    ACCEPT_FILTERED = "accept_filtered", "Accept without flagged rows"
    HOLD = "hold", "Hold for review"
    REJECT = "reject", "Reject"


class ReviewStatus(models.TextChoices):
    """Where a held dataset or a held tuned model stands with its reviewers."""

    NONE = "", "Not held"
    PENDING = "pending", "Awaiting review"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"


class FineTuningJob(models.Model):
    """One fine-tuning job of one release, gated under the stage and tier it was created
    in; its training data screened before any training starts."""

    public_id = models.CharField(max_length=40, unique=True, default=new_job_id, editable=False)
    organization = models.ForeignKey(
        "access.Organization", on_delete=models.CASCADE, related_name="fine_tuning_jobs"
    )
    api_key = models.ForeignKey(
        "access.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    release = models.ForeignKey(
        "rollout.Release", on_delete=models.PROTECT, related_name="fine_tuning_jobs"
    )
    stage = models.CharField(max_length=40)
    tier = models.CharField(max_length=32)
    plan_version = models.PositiveIntegerField()
    training_file = models.ForeignKey(TrainingFile, on_delete=models.PROTECT, related_name="jobs")
    suffix = models.CharField(max_length=40, blank=True)
    seed = models.BigIntegerField()
    hyperparameters = models.JSONField(default=dict)
    status = models.CharField(
        max_length=20, choices=JobStatus.choices, default=JobStatus.VALIDATING_FILES
    )
    error_code = models.CharField(max_length=64, blank=True)
    error_message = RedactedTextField(blank=True)
    error_param = models.CharField(max_length=64, blank=True)
    # Screening of the training file (tuning.dataset_screening)
    verdict = models.CharField(max_length=20, choices=DatasetVerdict.choices, blank=True)
    verdict_reason = RedactedTextField(blank=True)
    screened_at = models.DateTimeField(null=True, blank=True)
    rows_total = models.PositiveIntegerField(default=0)
    rows_flagged = models.PositiveIntegerField(default=0)
    rows_blocked = models.PositiveIntegerField(default=0)
    rows_kept = models.PositiveIntegerField(default=0)
    categories = models.JSONField(default=dict, help_text="Rows per screening category.")
    kept_lines = models.JSONField(default=list, help_text="Lines trained on (accept_filtered).")
    dataset_review = models.CharField(
        max_length=10, choices=ReviewStatus.choices, blank=True, default=ReviewStatus.NONE
    )
    approvals_needed = models.PositiveSmallIntegerField(default=1)
    # Training by the release's upstream
    upstream_file_id = models.CharField(max_length=200, blank=True)
    upstream_job_id = models.CharField(max_length=200, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    trained_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    fine_tuned_model = models.CharField(max_length=63, blank=True)
    # A runner works on one job at a time: it claims it until then (tuning.runner).
    claimed_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["organization", "-created_at"]),
            models.Index(fields=["release", "stage", "created_at"]),
            models.Index(fields=["status"]),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} {self.release_id} {self.status}"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobEvent(models.Model):
    """One line of a job's history, as OpenAI's ``fine_tuning.job.event``."""

    public_id = models.CharField(
        max_length=40, unique=True, default=new_job_event_id, editable=False
    )
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, default="info")  # info | warn | error
    message = RedactedTextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["job", "-created_at", "-id"])]

    def __str__(self) -> str:
        return f"{self.job_id} {self.level}: {self.message[:60]}"


class DatasetFinding(models.Model):
    """A row screening flagged or blocked, as a redacted excerpt for the reviewers; kept
    for the plan's ``retain_days``."""

    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="findings")
    line = models.PositiveIntegerField()
    action = models.CharField(max_length=8)  # flag | block
    source = models.CharField(max_length=8)  # prompt | answer | row
    categories = models.CharField(max_length=500)
    excerpt = RedactedTextField()
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["job_id", "line", "id"]
        indexes = [models.Index(fields=["expires_at"])]

    def __str__(self) -> str:
        return f"line {self.line} {self.action} {self.categories}"


class TunedModelStatus(models.TextChoices):
    ASSESSING = "assessing", "Being assessed"
    HELD = "held", "Held for review"
    ACTIVE = "active", "Callable"
    REJECTED = "rejected", "Rejected"


class TunedModel(models.Model):
    """A model a succeeded job made: served by the proxy as a release of its own, only to
    its organization, under its parent's current stage and state (``access.snapshot``),
    and only once its assessment passed or reviewers released it."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_tuned_model_id, editable=False
    )
    name = models.CharField(max_length=63, unique=True)
    job = models.OneToOneField(FineTuningJob, on_delete=models.PROTECT, related_name="tuned_model")
    organization = models.ForeignKey(
        "access.Organization", on_delete=models.CASCADE, related_name="tuned_models"
    )
    parent = models.ForeignKey(
        "rollout.Release", on_delete=models.PROTECT, related_name="tuned_models"
    )
    upstream_model = models.CharField(max_length=200)
    status = models.CharField(
        max_length=12, choices=TunedModelStatus.choices, default=TunedModelStatus.ASSESSING
    )
    held_reason = RedactedTextField(blank=True)
    approvals_needed = models.PositiveSmallIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name


class Assessment(models.Model):
    """One run of the plan's assessment on a tuned model against its parent
    (``tuning.assessment``), kept with every prompt's outcome."""

    tuned_model = models.ForeignKey(
        TunedModel, on_delete=models.CASCADE, related_name="assessments"
    )
    release = models.ForeignKey("rollout.Release", on_delete=models.PROTECT, related_name="+")
    stage = models.CharField(max_length=40)
    tier = models.CharField(max_length=32)
    organization = models.ForeignKey(
        "access.Organization", on_delete=models.CASCADE, related_name="+"
    )
    plan_version = models.PositiveIntegerField()
    passed = models.BooleanField()
    reasons = models.JSONField(default=list)
    results = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["release", "stage", "created_at"])]

    def __str__(self) -> str:
        return f"{self.tuned_model_id} {'passed' if self.passed else 'failed'}"


class DecisionSubject(models.TextChoices):
    DATASET = "dataset", "Held dataset"
    MODEL = "model", "Held tuned model"


class DecisionVerdict(models.TextChoices):
    APPROVE = "approve", "Approve"
    REJECT = "reject", "Reject"


class TuningDecision(models.Model):
    """A reviewer's approve or reject of a held dataset or a held tuned model. Immutable;
    one per reviewer, job and subject, so four eyes are two different people."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_tuning_decision_id, editable=False
    )
    job = models.ForeignKey(FineTuningJob, on_delete=models.PROTECT, related_name="decisions")
    subject = models.CharField(max_length=8, choices=DecisionSubject.choices)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    verdict = models.CharField(max_length=8, choices=DecisionVerdict.choices)
    comment = RedactedTextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "subject", "reviewer"], name="one_tuning_decision_per_reviewer"
            )
        ]

    def __str__(self) -> str:
        return f"{self.reviewer_id} {self.verdict} {self.subject} of {self.job_id}"
