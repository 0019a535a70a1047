from django.contrib import admin, messages

from monitoring.admin_base import AuditedModelAdmin, ReadOnlyAdmin
from rollout import incidents, transitions
from rollout.models import (
    Approval,
    Incident,
    IncidentStatus,
    Release,
    Review,
    RolloutPlan,
    StageTransition,
    Verdict,
)
from stagegate.errors import Refused


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


class ApprovalInline(admin.TabularInline):
    model = Approval
    fields = ("reviewer", "verdict", "comment", "plan", "stage", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Review)
class ReviewAdmin(ReadOnlyAdmin):
    """Reviews are immutable. Reviewers approve or reject the selected reviews with the
    actions; the same rules as the API apply (not your own, not a stale one)."""

    list_display = ("public_id", "release", "stage", "recommendation", "summary", "created_at")
    list_filter = ("release", "recommendation", "trigger")
    readonly_fields = [f.name for f in Review._meta.fields]
    inlines = [ApprovalInline]
    actions = ["approve", "reject"]

    def _verdict(self, request, queryset, verdict: str) -> None:
        for review in queryset.select_related("release"):
            try:
                result = transitions.approve(review, reviewer=request.user, verdict=verdict)
            except Refused as refused:
                self.message_user(request, f"{review.public_id}: {refused.message}", messages.ERROR)
                continue
            text = f"{review.public_id}: {verdict} recorded"
            if result.transition is not None:
                text += f"; {review.release} advanced to {result.transition.to_stage}"
            elif result.blocked:
                text += f"; advance refused ({result.blocked})"
            self.message_user(request, text, messages.SUCCESS)

    @admin.action(description="Approve the selected reviews")
    def approve(self, request, queryset):
        self._verdict(request, queryset, Verdict.APPROVE)

    @admin.action(description="Reject the selected reviews")
    def reject(self, request, queryset):
        self._verdict(request, queryset, Verdict.REJECT)


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    list_display = ("review", "reviewer", "verdict", "stage", "created_at")
    list_filter = ("verdict",)
    readonly_fields = [f.name for f in Approval._meta.fields]


@admin.register(Incident)
class IncidentAdmin(AuditedModelAdmin):
    """Filing here is the same as through the API (audited, incident tripwires run at
    once). To resolve, set the status to resolved and say how in the resolution."""

    list_display = ("title", "release", "stage", "severity", "status", "created_at")
    list_filter = ("status", "severity", "release")
    search_fields = ("title", "public_id")

    def get_readonly_fields(self, request, obj=None):
        fixed = ("public_id", "opened_by", "created_at", "resolved_at", "resolved_by")
        if obj is None:
            return (*fixed, "status", "resolution")
        if obj.status == IncidentStatus.RESOLVED:
            return [f.name for f in Incident._meta.fields]
        return (*fixed, "release", "stage", "severity")

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is None:
            form.base_fields["stage"].required = False
            form.base_fields["stage"].help_text = "Leave blank for the release's current stage."
        return form

    def save_model(self, request, obj, form, change):
        if not change:
            incident = incidents.file_incident(
                obj.release,
                severity=obj.severity,
                title=obj.title,
                description=obj.description,
                stage=obj.stage or None,
                actor=request.user,
            )
            obj.pk, obj.public_id = incident.pk, incident.public_id
            return
        if "status" in form.changed_data and obj.status == IncidentStatus.RESOLVED:
            incidents.resolve_incident(obj, actor=request.user, resolution=obj.resolution)
            return
        super().save_model(request, obj, form, change)

    def has_delete_permission(self, request, obj=None):
        return False
