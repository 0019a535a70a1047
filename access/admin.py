from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.utils import timezone

from access import keys, tier_changes
from access.models import ApiKey, Membership, Organization, Verification, VerificationStatus
from monitoring.admin_base import AuditedModelAdmin, ReadOnlyAdmin


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(Organization)
class OrganizationAdmin(AuditedModelAdmin):
    list_display = ("slug", "name", "tier", "created_at")
    list_filter = ("tier",)
    search_fields = ("slug", "name", "public_id")
    readonly_fields = ("public_id",)
    inlines = [MembershipInline]

    def get_readonly_fields(self, request, obj=None):
        # Rollout plans name organizations by slug: it is set once, when created.
        if obj is not None:
            return (*self.readonly_fields, "slug")
        return self.readonly_fields


@admin.register(Verification)
class VerificationAdmin(AuditedModelAdmin):
    list_display = ("organization", "kind", "status", "expires_at", "verified_by")
    list_filter = ("kind", "status")
    search_fields = ("organization__slug", "public_id")
    readonly_fields = ("public_id", "status", "verified_by", "verified_at")
    actions = ["mark_valid", "revoke"]

    def _set_status(self, request, queryset, status):
        for verification in queryset:
            tier_changes.set_verification_status(verification, status=status, actor=request.user)
        self.message_user(request, f"{queryset.count()} verification(s) now {status}.")

    @admin.action(description="Mark selected verifications valid")
    def mark_valid(self, request, queryset):
        self._set_status(request, queryset, VerificationStatus.VALID)

    @admin.action(description="Revoke selected verifications")
    def revoke(self, request, queryset):
        self._set_status(request, queryset, VerificationStatus.REVOKED)


@admin.register(Membership)
class MembershipAdmin(AuditedModelAdmin):
    list_display = ("user", "organization", "role")
    list_filter = ("role",)
    autocomplete_fields = ("user", "organization")


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    """Keys are issued with ``manage.py issue_key`` or the API (the secret is shown
    once there); the admin lists them and revokes them, audited."""

    list_display = ("prefix", "name", "organization", "status", "expires_at", "last_used_at")
    list_filter = ("organization",)
    search_fields = ("key_id", "name", "organization__slug")
    fields = (
        "public_id",
        "prefix",
        "organization",
        "name",
        "created_by",
        "created_at",
        "expires_at",
        "revoked_at",
        "revoked_reason",
        "last_used_at",
        "rotated_from",
    )
    readonly_fields = fields
    actions = ["revoke"]

    @admin.display(description="status")
    def status(self, obj):
        return obj.status_at(timezone.now())

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            keys.revoke_key(api_key=api_key, actor=request.user, reason="revoked in admin")
        self.message_user(request, f"{queryset.count()} key(s) revoked.", messages.SUCCESS)


# Users and their roles (groups) are access changes too: audit them.
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class AuditedUserAdmin(AuditedModelAdmin, UserAdmin):
    audit_exclude = ("password",)

    def user_change_password(self, request, id, form_url=""):
        # Django's view saves the new password outside save_model; wrap it so the
        # audit row (written from log_change) commits or rolls back with it.
        with transaction.atomic():
            return super().user_change_password(request, id, form_url)

    def log_change(self, request, obj, message):
        entry = super().log_change(request, obj, message)
        if request.path.endswith("/password/"):
            self._audit(request, obj, "password_changed", {})
        return entry


@admin.register(Group)
class AuditedGroupAdmin(AuditedModelAdmin, GroupAdmin):
    pass
