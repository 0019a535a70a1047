from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models.functions import Lower

from monitoring.redaction import RedactedCharField, RedactedTextField
from stagegate import keyformat
from stagegate.ids import new_key_public_id, new_membership_id, new_org_id, new_verification_id

ORG_SLUG_RULE = (
    "lower-case letters, digits, hyphens and underscores, starting with a letter or digit"
)
# The plan's slug pattern (rollout.plan_schema.SLUG_PATTERN) without the dot a SlugField
# never held, so every organization slug is one a plan can name in allow_orgs and
# deny_orgs (tests/access/test_api_orgs.py ties the two). A RegexValidator, so that the
# OpenAPI schema shows the pattern the API enforces.
ORG_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}\Z"
validate_org_slug = RegexValidator(
    ORG_SLUG_PATTERN, message=f"must be {ORG_SLUG_RULE}", code="invalid_slug"
)


class Tier(models.TextChoices):
    RESEARCH_PARTNER = "research_partner", "Research partner"
    VERIFIED_COMMERCIAL = "verified_commercial", "Verified commercial"
    CREDENTIALED_ACADEMIC = "credentialed_academic", "Credentialed academic"
    PUBLIC = "public", "Public"


class Organization(models.Model):
    """A customer. ``tier`` is the trust class it claims; what counts at a stage is
    its effective tier (``access.tiers.effective_tier``), which also needs valid
    verifications."""

    public_id = models.CharField(max_length=24, unique=True, default=new_org_id, editable=False)
    # Immutable once created (access.organizations.update_organization): rollout plans
    # name organizations by slug, and the cohort hash is taken over it.
    slug = models.SlugField(
        max_length=63, unique=True, validators=[validate_org_slug], help_text=ORG_SLUG_RULE
    )
    name = RedactedCharField(max_length=200)
    tier = models.CharField(max_length=32, choices=Tier.choices, default=Tier.PUBLIC)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(slug=Lower("slug")), name="organization_slug_lower_case"
            )
        ]

    def __str__(self) -> str:
        return self.slug


class VerificationKind(models.TextChoices):
    BUSINESS_KYC = "business_kyc", "Business KYC"
    ACADEMIC_CREDENTIAL = "academic_credential", "Academic credential"
    MONITORING_AGREEMENT = "monitoring_agreement", "Signed monitoring agreement"


class VerificationStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    VALID = "valid", "Valid"
    REJECTED = "rejected", "Rejected"
    REVOKED = "revoked", "Revoked"
    EXPIRED = "expired", "Expired"


class Verification(models.Model):
    """Evidence that an organization earned its tier, valid until ``expires_at``."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_verification_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="verifications"
    )
    kind = models.CharField(max_length=32, choices=VerificationKind.choices)
    status = models.CharField(
        max_length=16, choices=VerificationStatus.choices, default=VerificationStatus.PENDING
    )
    verified_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    evidence_note = RedactedTextField(blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization_id", "kind", "-expires_at"]
        indexes = [models.Index(fields=["status", "expires_at"])]

    def __str__(self) -> str:
        return f"{self.organization} {self.kind} ({self.status})"

    def is_valid_at(self, now: datetime) -> bool:
        return self.status == VerificationStatus.VALID and self.expires_at > now


class MembershipRole(models.TextChoices):
    ORG_ADMIN = "org_admin", "Organization admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    public_id = models.CharField(
        max_length=24, unique=True, default=new_membership_id, editable=False
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(
        max_length=16, choices=MembershipRole.choices, default=MembershipRole.MEMBER
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization_id", "user_id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "organization"], name="one_membership_per_org")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class ApiKey(models.Model):
    """An organization's API key. Only the SHA-256 digest of the secret is stored;
    ``key_id`` is the non-secret lookup id that is also embedded in the key itself
    (see ``access.keys``)."""

    public_id = models.CharField(
        max_length=24, unique=True, default=new_key_public_id, editable=False
    )
    key_id = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="keys")
    name = RedactedCharField(max_length=100)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_reason = RedactedCharField(max_length=200, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    rotated_from = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="rotated_to"
    )

    class Meta:
        ordering = ["organization_id", "-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def prefix(self) -> str:
        """What a person sees to recognise the key; never enough to use it."""
        return f"{keyformat.PREFIX}{self.key_id}"

    def status_at(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"
