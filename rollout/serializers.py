"""Serializers of the rollout API: releases, plan versions, transitions, and the
inputs and replies of validating and applying a plan."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from rollout.models import (
    Approval,
    Incident,
    IncidentStatus,
    Release,
    ReleaseState,
    Review,
    RolloutPlan,
    Severity,
    StageTransition,
)
from stagegate.api import ModelSerializer, Serializer, StrictCharField, choice_filter


class ReleaseSerializer(serializers.ModelSerializer):
    active_plan_version = serializers.IntegerField(
        source="active_plan.version", read_only=True, allow_null=True, default=None
    )

    class Meta:
        model = Release
        fields = (
            "public_id",
            "name",
            "description",
            "current_stage",
            "state",
            "upstream_model",
            "stage_entered_at",
            "active_plan_version",
        )
        read_only_fields = fields


class PlanVersionSerializer(serializers.ModelSerializer):
    """One version in a release's plan history."""

    created_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = RolloutPlan
        fields = ("public_id", "version", "digest", "comment", "created_by", "created_at")
        read_only_fields = fields


class PlanDocumentSerializer(PlanVersionSerializer):
    """One plan version with its canonical document (``rollout.plan_schema``)."""

    document = serializers.JSONField(
        read_only=True, help_text="The canonical plan document, every default filled in."
    )

    class Meta(PlanVersionSerializer.Meta):
        fields = (*PlanVersionSerializer.Meta.fields, "document")
        read_only_fields = fields


@extend_schema_field({"type": "string", "enum": list(ReleaseState.values)})
class _StateField(serializers.CharField):
    """A release state; its own enum in the schema (the same values as Release.state)."""


class TransitionSerializer(serializers.ModelSerializer):
    to_state = _StateField(read_only=True)
    review = serializers.SlugRelatedField(slug_field="public_id", read_only=True, allow_null=True)
    release = serializers.SlugRelatedField(slug_field="name", read_only=True)
    plan_version = serializers.IntegerField(source="plan.version", read_only=True)
    actor = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = StageTransition
        fields = (
            "public_id",
            "release",
            "kind",
            "from_stage",
            "to_stage",
            "from_state",
            "to_state",
            "plan_version",
            "actor",
            "reason",
            "review",
            "created_at",
        )
        read_only_fields = fields


@extend_schema_field(
    {
        "oneOf": [
            {"type": "object", "additionalProperties": True},
            {"type": "string", "description": "The plan as YAML (or JSON) text."},
        ]
    }
)
class PlanSourceField(serializers.JSONField):
    """A plan given as a JSON object or as YAML text."""

    def to_internal_value(self, data):
        if not isinstance(data, str | dict):
            raise serializers.ValidationError("must be an object or a YAML string")
        return data


class PlanSourceSerializer(Serializer):
    document = PlanSourceField(help_text="The rollout plan: a JSON object or YAML text.")
    comment = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=300,
        help_text="Why this version (apply only).",
    )


class PlanValidateResultSerializer(serializers.Serializer):
    valid = serializers.BooleanField()
    release = StrictCharField()
    changed = serializers.BooleanField(help_text="False when equal to the active version.")
    version = serializers.IntegerField(help_text="The version applying it would create.")
    previous_version = serializers.IntegerField(allow_null=True)
    created_release = serializers.BooleanField()
    diff = StrictCharField(help_text="Unified diff of the canonical YAML.")


class PlanApplyResultSerializer(serializers.Serializer):
    changed = serializers.BooleanField()
    release = StrictCharField()
    version = serializers.IntegerField(help_text="The new version, or the active one.")
    previous_version = serializers.IntegerField(allow_null=True, required=False)
    created_release = serializers.BooleanField(required=False)
    diff = StrictCharField(required=False)


# --- reviews, approvals, incidents, transitions requested --------------------------------------


class ApprovalSerializer(serializers.ModelSerializer):
    review = serializers.SlugRelatedField(slug_field="public_id", read_only=True)
    reviewer = serializers.SlugRelatedField(slug_field="username", read_only=True)
    plan_version = serializers.IntegerField(source="plan.version", read_only=True)

    class Meta:
        model = Approval
        fields = (
            "public_id",
            "review",
            "reviewer",
            "verdict",
            "comment",
            "stage",
            "plan_version",
            "created_at",
        )
        read_only_fields = fields


class ReviewSerializer(serializers.ModelSerializer):
    release = serializers.SlugRelatedField(slug_field="name", read_only=True)
    plan_version = serializers.IntegerField(source="plan.version", read_only=True)
    requested_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Review
        fields = (
            "public_id",
            "release",
            "stage",
            "next_stage",
            "plan_version",
            "recommendation",
            "summary",
            "criteria",
            "tripwires",
            "telemetry",
            "approvals_needed",
            "trigger",
            "requested_by",
            "created_at",
        )
        read_only_fields = fields


class ReviewDetailSerializer(ReviewSerializer):
    """A review with its approvals and whether they still count."""

    approvals = ApprovalSerializer(many=True, read_only=True)
    approvals_counted = serializers.SerializerMethodField(
        help_text="Approvals that count toward the advance now."
    )
    stale = serializers.SerializerMethodField(
        help_text="Why approvals of this review no longer count (a code), or null."
    )
    transition = serializers.SerializerMethodField(help_text="The advance it carried out.")

    class Meta(ReviewSerializer.Meta):
        fields = (
            *ReviewSerializer.Meta.fields,
            "approvals",
            "approvals_counted",
            "stale",
            "transition",
        )
        read_only_fields = fields

    def get_approvals_counted(self, review) -> int:
        from rollout.transitions import counted_approvals

        return len(counted_approvals(review))

    def get_stale(self, review) -> str | None:
        from rollout.transitions import stale_reason

        refused = stale_reason(review, review.release)
        return refused.code if refused else None

    def get_transition(self, review) -> str | None:
        transition = StageTransition.objects.filter(review=review).only("public_id").first()
        return transition.public_id if transition else None


class ReviewRequestSerializer(Serializer):
    release = StrictCharField(help_text="The release's public_id or name.")


class VerdictSerializer(Serializer):
    comment = StrictCharField(required=False, allow_blank=True, default="", max_length=2000)


class ApproveResultSerializer(serializers.Serializer):
    approval = ApprovalSerializer()
    transition = TransitionSerializer(allow_null=True)
    blocked = StrictCharField(
        help_text="Why the approvals were complete but the advance was refused, or blank."
    )


class ReasonSerializer(Serializer):
    reason = StrictCharField(max_length=1000, help_text="Why; kept in the audit log.")


class RollbackSerializer(ReasonSerializer):
    from_stage = StrictCharField(
        required=False,
        max_length=40,
        help_text="Roll back only if the release is still in this stage (safe to repeat).",
    )


class IncidentSerializer(ModelSerializer):
    release = serializers.SlugRelatedField(
        slug_field="name", queryset=Release.objects.all(), help_text="The release's name."
    )
    stage = StrictCharField(
        required=False, max_length=40, help_text="Defaults to the release's current stage."
    )
    severity = serializers.ChoiceField(choices=Severity.choices)
    opened_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    resolved_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Incident
        fields = (
            "public_id",
            "release",
            "stage",
            "severity",
            "status",
            "title",
            "description",
            "opened_by",
            "created_at",
            "resolved_at",
            "resolved_by",
            "resolution",
        )
        read_only_fields = (
            "public_id",
            "status",
            "opened_by",
            "created_at",
            "resolved_at",
            "resolved_by",
            "resolution",
        )


class IncidentFilterSerializer(serializers.Serializer):
    """The query filters of the incident list."""

    release = StrictCharField(
        required=False, allow_blank=True, help_text="Only this release (public_id or name)."
    )
    status = choice_filter(IncidentStatus.choices, help_text="Only incidents in this state.")


class ResolveSerializer(Serializer):
    resolution = StrictCharField(max_length=2000, help_text="How it was resolved.")
