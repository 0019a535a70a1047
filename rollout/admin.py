from django.contrib import admin

from monitoring.admin_base import AuditedModelAdmin, ReadOnlyAdmin
from rollout.models import Release, RolloutPlan, StageTransition


@admin.register(Release)
class ReleaseAdmin(AuditedModelAdmin):
    """Stage and plan change only through plans and transitions; here only the
    description can be edited."""

    list_display = ("name", "current_stage", "state", "upstream_model", "stage_entered_at")
    list_filter = ("state",)
    search_fields = ("name", "public_id")
    readonly_fields = (
        "public_id",
        "name",
        "upstream_base_url",
        "upstream_model",
        "current_stage",
        "state",
        "active_plan",
        "stage_entered_at",
        "version",
    )

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(RolloutPlan)
class RolloutPlanAdmin(ReadOnlyAdmin):
    """Plan versions are immutable; apply new ones with ``manage.py apply_plan`` or the API."""

    list_display = ("release", "version", "digest", "comment", "created_by", "created_at")
    list_filter = ("release",)
    readonly_fields = [f.name for f in RolloutPlan._meta.fields]


@admin.register(StageTransition)
class StageTransitionAdmin(ReadOnlyAdmin):
    list_display = ("release", "kind", "from_stage", "to_stage", "to_state", "actor", "created_at")
    list_filter = ("release", "kind")
    readonly_fields = [f.name for f in StageTransition._meta.fields]
