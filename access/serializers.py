"""Serializers of the access API: organizations, memberships, verifications, API keys.

Objects are named by their random ``public_id``; integer primary keys never leave
the server. Raw API keys appear only in ``IssuedKeySerializer``, the one-time reply
to issuing or rotating a key.
"""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from access.models import (
    ApiKey,
    Membership,
    MembershipRole,
    Organization,
    Verification,
    VerificationStatus,
)
from access.tier_changes import effective_tiers_by_release
from stagegate.api import ModelSerializer, Serializer, StrictCharField

KEY_STATUSES = ("active", "revoked", "expired")
# A rotation grace longer than this is a second key in disguise; issue one instead.
MAX_GRACE_HOURS = 24 * 30


def _in_future(value):
    if value is not None and value <= timezone.now():
        raise serializers.ValidationError("must be in the future")
    return value


# --- organizations -------------------------------------------------------------------------


class OrganizationSerializer(ModelSerializer):
    class Meta:
        model = Organization
        fields = ("public_id", "slug", "name", "tier", "created_at")
        read_only_fields = ("public_id", "created_at")
        # The model's default tier is not a choice the API makes for the caller:
        # organizations.create_organization requires one.
        extra_kwargs = {"tier": {"required": True}}


class OrganizationDetailSerializer(OrganizationSerializer):
    effective_tiers = serializers.SerializerMethodField(
        help_text="Release name → the tier the organization's valid evidence supports at "
        "that release's current stage (``public`` when evidence is missing or expired)."
    )

    class Meta(OrganizationSerializer.Meta):
        fields = (*OrganizationSerializer.Meta.fields, "effective_tiers")

    @extend_schema_field(serializers.DictField(child=StrictCharField()))
    def get_effective_tiers(self, organization: Organization) -> dict[str, str]:
        return effective_tiers_by_release(organization, timezone.now())


class MembershipSerializer(ModelSerializer):
    username = StrictCharField(source="user.username", max_length=150)
    role = serializers.ChoiceField(choices=MembershipRole.choices, default=MembershipRole.MEMBER)

    class Meta:
        model = Membership
        fields = ("public_id", "username", "role", "created_at")
        read_only_fields = ("public_id", "created_at")

    def validate(self, attrs):
        # Whom the requester may add is the service's decision (organizations.add_member).
        attrs["username"] = attrs.pop("user")["username"]
        return attrs


# --- verifications -------------------------------------------------------------------------


class VerificationSerializer(ModelSerializer):
    """A verification; ``VerificationCreateSerializer`` records a new one in the same
    shape (organization, kind, expires_at, evidence_note and status are writable)."""

    organization = StrictCharField(
        source="organization.public_id",
        max_length=24,
        help_text="public_id of the organization (org_…)",
    )
    status = serializers.ChoiceField(
        choices=VerificationStatus.choices,
        default=VerificationStatus.PENDING,
        help_text="Where the evidence stands (a new one is pending or valid).",
    )
    evidence_note = StrictCharField(required=False, allow_blank=True, default="")
    expires_at = serializers.DateTimeField(validators=[_in_future])
    verified_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Verification
        fields = (
            "public_id",
            "organization",
            "kind",
            "status",
            "evidence_note",
            "verified_by",
            "verified_at",
            "expires_at",
            "created_at",
        )
        read_only_fields = ("public_id", "verified_by", "verified_at", "created_at")

    def validate(self, attrs):
        attrs["organization"] = attrs["organization"]["public_id"]
        return attrs


class VerificationCreateSerializer(VerificationSerializer):
    """What records a new verification: its status is pending or valid, never more."""

    status = serializers.ChoiceField(
        choices=[VerificationStatus.PENDING, VerificationStatus.VALID],
        default=VerificationStatus.PENDING,
        help_text="pending, or valid when the evidence was checked.",
    )


class VerificationRevokeSerializer(Serializer):
    reason = StrictCharField(required=False, allow_blank=True, default="", max_length=500)


class VerificationValidateSerializer(Serializer):
    note = StrictCharField(required=False, allow_blank=True, default="", max_length=500)


# --- API keys --------------------------------------------------------------------------------


class ApiKeySerializer(serializers.ModelSerializer):
    """What anyone allowed to see a key sees: never the secret, never its digest."""

    organization = serializers.SlugRelatedField(slug_field="public_id", read_only=True)
    prefix = StrictCharField(read_only=True, help_text="recognises the key; cannot use it")
    status = serializers.SerializerMethodField()
    rotated_from = serializers.SlugRelatedField(
        slug_field="public_id", read_only=True, allow_null=True
    )

    class Meta:
        model = ApiKey
        fields = (
            "public_id",
            "organization",
            "name",
            "prefix",
            "status",
            "created_at",
            "expires_at",
            "revoked_at",
            "revoked_reason",
            "last_used_at",
            "rotated_from",
        )
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=KEY_STATUSES))
    def get_status(self, api_key: ApiKey) -> str:
        now = self.context.get("now") or timezone.now()
        return api_key.status_at(now)


class IssuedKeySerializer(ApiKeySerializer):
    """The reply to issuing or rotating a key: the only time the raw key is shown."""

    key = serializers.SerializerMethodField(
        help_text="The raw API key. Shown once, in this reply only; it cannot be retrieved "
        "again (only its SHA-256 digest is stored)."
    )

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "key")
        read_only_fields = fields

    @extend_schema_field(
        {"type": "string", "enum": ["active"], "description": "A new key is always active."}
    )
    def get_status(self, api_key: ApiKey) -> str:
        return super().get_status(api_key)

    def get_key(self, api_key: ApiKey) -> str:
        return self.context["raw_key"]


class ApiKeyCreateSerializer(Serializer):
    organization = StrictCharField(max_length=24, help_text="public_id of the organization (org_…)")
    name = StrictCharField(max_length=100)
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, default=None, validators=[_in_future]
    )


class ApiKeyRevokeSerializer(Serializer):
    reason = StrictCharField(required=False, allow_blank=True, default="", max_length=200)


class ApiKeyRotateSerializer(Serializer):
    grace_hours = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_GRACE_HOURS,
        help_text="How long the old key keeps working; 0 expires it at once. "
        "Default: STAGEGATE_ROTATION_GRACE_HOURS.",
    )

    def validate(self, attrs):
        attrs.setdefault("grace_hours", settings.STAGEGATE_ROTATION_GRACE_HOURS)
        return attrs
