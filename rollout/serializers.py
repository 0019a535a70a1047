"""Serializers of the rollout API: releases, plan versions, transitions, and the
inputs and replies of validating and applying a plan."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from rollout.models import Release, ReleaseState, RolloutPlan, StageTransition


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

    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

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
    release = serializers.SlugRelatedField(slug_field="name", read_only=True)
    plan_version = serializers.IntegerField(source="plan.version", read_only=True)
    actor = serializers.SlugRelatedField(slug_field="username", read_only=True)

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


class PlanSourceSerializer(serializers.Serializer):
    document = PlanSourceField(help_text="The rollout plan: a JSON object or YAML text.")
    comment = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=300,
        help_text="Why this version (apply only).",
    )


class PlanValidateResultSerializer(serializers.Serializer):
    valid = serializers.BooleanField()
    release = serializers.CharField()
    changed = serializers.BooleanField(help_text="False when equal to the active version.")
    version = serializers.IntegerField(help_text="The version applying it would create.")
    previous_version = serializers.IntegerField(allow_null=True)
    created_release = serializers.BooleanField()
    diff = serializers.CharField(help_text="Unified diff of the canonical YAML.")


class PlanApplyResultSerializer(serializers.Serializer):
    changed = serializers.BooleanField()
    release = serializers.CharField()
    version = serializers.IntegerField(help_text="The new version, or the active one.")
    previous_version = serializers.IntegerField(allow_null=True, required=False)
    created_release = serializers.BooleanField(required=False)
    diff = serializers.CharField(required=False)
