from django.contrib import admin

from monitoring.admin_base import ReadOnlyAdmin
from monitoring.models import (
    AuditEvent,
    FlaggedSample,
    RollupCursor,
    UsageEvent,
    UsageFlagRollup,
    UsageRollup,
)


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the audit log is append-only (the database refuses edits too)."""

    list_display = ("seq", "created_at", "actor", "action", "object_type", "object_id")
    list_filter = ("action", "object_type")
    search_fields = ("object_id", "actor", "action")
    readonly_fields = [f.name for f in AuditEvent._meta.fields]


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    """Usage events are telemetry written by the proxy; nobody edits them."""

    list_display = ("created_at", "release", "stage", "tier", "org", "endpoint", "reason", "status")
    list_filter = ("release", "stage", "tier", "decision", "reason")
    search_fields = ("org", "key", "request_id")
    date_hierarchy = "created_at"


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    """Minute and hour totals of the usage events, rebuilt by the rollup task."""

    list_display = (
        "bucket_start",
        "bucket_seconds",
        "release",
        "stage",
        "tier",
        "org",
        "reason",
        "key",
        "requests",
        "allowed",
        "denied",
        "errors",
        "flagged",
    )
    list_filter = ("bucket_seconds", "release", "stage", "tier", "reason")
    search_fields = ("org", "key")
    readonly_fields = [f.name for f in UsageRollup._meta.fields]


@admin.register(UsageFlagRollup)
class UsageFlagRollupAdmin(ReadOnlyAdmin):
    """Screening's flags per category, minute and hour, rebuilt by the rollup task."""

    list_display = (
        "bucket_start",
        "bucket_seconds",
        "release",
        "stage",
        "tier",
        "org",
        "reason",
        "key",
        "category",
        "flagged",
        "denied",
    )
    list_filter = ("bucket_seconds", "release", "stage", "category")
    search_fields = ("org", "key", "category")
    readonly_fields = [f.name for f in UsageFlagRollup._meta.fields]


@admin.register(FlaggedSample)
class FlaggedSampleAdmin(ReadOnlyAdmin):
    """Kept for human review, decided in the console's flag queue (audited there), and
    deleted when they expire: nobody edits them here."""

    list_display = ("created_at", "release", "stage", "org", "categories", "action", "status")
    list_filter = ("release", "stage", "status", "action", "source")
    search_fields = ("request_id", "org", "key", "categories")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in FlaggedSample._meta.fields]


@admin.register(RollupCursor)
class RollupCursorAdmin(ReadOnlyAdmin):
    """How far the rollups have got (their freshness)."""

    list_display = ("name", "last_event_id", "rolled_up_to", "updated_at")
    readonly_fields = [f.name for f in RollupCursor._meta.fields]
