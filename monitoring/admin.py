from django.contrib import admin

from monitoring.admin_base import ReadOnlyAdmin
from monitoring.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the audit log is append-only (the database refuses edits too)."""

    list_display = ("seq", "created_at", "actor", "action", "object_type", "object_id")
    list_filter = ("action", "object_type")
    search_fields = ("object_id", "actor", "action")
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
