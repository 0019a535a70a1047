"""Serializers of the fine-tuning API (``tuning.api``): jobs as the reviewers see them
(the screening's verdict and counts, the flagged rows' redacted excerpts, the tuned
model, its latest assessment and the decisions so far), the list's query filters, and a
reviewer's decision on a held dataset or a held tuned model with what it did."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from stagegate.api import Serializer, StrictCharField, choice_filter
from tuning.models import (
    Assessment,
    DatasetFinding,
    DatasetVerdict,
    DecisionVerdict,
    FineTuningJob,
    JobStatus,
    ReviewStatus,
    TunedModel,
    TuningDecision,
)

COMMENT_MAX = 2000  # as the console's decision form
# A job's page lists at most this many flagged rows; ``findings_total`` says how many
# are kept in all (a 10,000-row file may flag every row).
FINDINGS_LIMIT = 500
# ``dataset_review`` of a job whose dataset was never held is blank: not a filter value.
HELD_CHOICES = [(value, label) for value, label in ReviewStatus.choices if value]


class FineTuningJobFilterSerializer(serializers.Serializer):
    """The query filters of the job list."""

    release = StrictCharField(
        required=False, allow_blank=True, help_text="Only this release (public_id or name)."
    )
    status = choice_filter(JobStatus.choices, help_text="Only jobs in this state.")
    dataset_review = choice_filter(
        HELD_CHOICES, help_text="Only jobs whose held dataset stands so with its reviewers."
    )


class TunedModelSummarySerializer(serializers.ModelSerializer):
    """The model a succeeded job made, and where it stands (held until reviewers
    release it when its assessment failed)."""

    class Meta:
        model = TunedModel
        fields = ("public_id", "name", "status", "held_reason", "approvals_needed", "created_at")
        read_only_fields = fields


class FineTuningJobSerializer(serializers.ModelSerializer):
    """A job in the list: its gate, state, screening verdict and counts, its model."""

    organization = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    release = serializers.SlugRelatedField(slug_field="name", read_only=True)
    training_file = serializers.SlugRelatedField(slug_field="public_id", read_only=True)
    dataset_verdict = serializers.ChoiceField(
        source="verdict",
        choices=DatasetVerdict.choices,
        allow_blank=True,
        read_only=True,
        help_text="The screening's verdict on the training file; blank until screened.",
    )
    tuned_model = TunedModelSummarySerializer(
        read_only=True, allow_null=True, help_text="Null until the job has made a model."
    )

    class Meta:
        model = FineTuningJob
        fields = (
            "public_id",
            "organization",
            "release",
            "stage",
            "tier",
            "plan_version",
            "training_file",
            "suffix",
            "status",
            "dataset_verdict",
            "dataset_review",
            "approvals_needed",
            "rows_total",
            "rows_flagged",
            "rows_blocked",
            "rows_kept",
            "fine_tuned_model",
            "tuned_model",
            "error_code",
            "created_at",
            "finished_at",
        )
        read_only_fields = fields


class DatasetFindingSerializer(serializers.ModelSerializer):
    """A row the screening flagged or blocked, as a redacted excerpt."""

    class Meta:
        model = DatasetFinding
        fields = ("line", "action", "source", "categories", "excerpt", "expires_at")
        read_only_fields = fields


class AssessmentSerializer(serializers.ModelSerializer):
    """One run of the plan's assessment on a tuned model against its parent."""

    class Meta:
        model = Assessment
        fields = ("passed", "reasons", "results", "stage", "tier", "plan_version", "created_at")
        read_only_fields = fields


class TuningDecisionSerializer(serializers.ModelSerializer):
    reviewer = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = TuningDecision
        fields = ("public_id", "subject", "reviewer", "verdict", "comment", "created_at")
        read_only_fields = fields


class FineTuningJobDetailSerializer(FineTuningJobSerializer):
    """A job with everything a reviewer decides from.

    The view passes in the context ``findings`` (at most ``FINDINGS_LIMIT``, by line),
    ``findings_total`` and ``latest_assessment`` (or None), and prefetches ``decisions``
    with their reviewers."""

    categories = serializers.DictField(
        child=serializers.IntegerField(), read_only=True, help_text="Rows per screening category."
    )
    findings = serializers.SerializerMethodField(
        help_text=f"The flagged and blocked rows still kept, by line (at most {FINDINGS_LIMIT})."
    )
    findings_total = serializers.SerializerMethodField(
        help_text="How many flagged and blocked rows are kept in all."
    )
    assessment = serializers.SerializerMethodField(
        help_text="The tuned model's latest assessment, or null."
    )
    decisions = TuningDecisionSerializer(
        many=True, read_only=True, help_text="Reviewers' decisions so far, oldest first."
    )

    class Meta(FineTuningJobSerializer.Meta):
        fields = (
            *FineTuningJobSerializer.Meta.fields,
            "verdict_reason",
            "screened_at",
            "categories",
            "findings",
            "findings_total",
            "error_message",
            "error_param",
            "trained_tokens",
            "assessment",
            "decisions",
        )
        read_only_fields = fields

    @extend_schema_field(DatasetFindingSerializer(many=True))
    def get_findings(self, job: FineTuningJob) -> list[dict[str, Any]]:
        return DatasetFindingSerializer(self.context["findings"], many=True).data

    def get_findings_total(self, job: FineTuningJob) -> int:
        return self.context["findings_total"]

    @extend_schema_field(AssessmentSerializer(allow_null=True))
    def get_assessment(self, job: FineTuningJob) -> dict[str, Any] | None:
        latest = self.context["latest_assessment"]
        return AssessmentSerializer(latest).data if latest is not None else None


class TuningVerdictSerializer(Serializer):
    """A reviewer's verdict on a held dataset or a held tuned model."""

    verdict = serializers.ChoiceField(choices=DecisionVerdict.choices)
    comment = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=COMMENT_MAX,
        help_text="Why; required to reject. Kept with the decision and in the audit log.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["verdict"] == DecisionVerdict.REJECT and not attrs["comment"]:
            raise serializers.ValidationError(
                {"comment": ["Say why you reject it: a comment is required."]}
            )
        return attrs


class TuningDecisionResultSerializer(serializers.Serializer):
    """What a decision did."""

    outcome = serializers.CharField(
        help_text="After the decision: the dataset's review status (pending, approved, "
        "rejected) or the tuned model's status (held, active, rejected)."
    )
    approvals = serializers.IntegerField(help_text="Approvals of this subject so far.")
    approvals_needed = serializers.IntegerField()
    decision = TuningDecisionSerializer()
    job = FineTuningJobSerializer(help_text="The job as the decision left it.")
