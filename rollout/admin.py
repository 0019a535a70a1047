from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse

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
from rollout.plans import plan_doc
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, ROLLOUT_ADMIN, can_read_all, staff_roles


class RoleAccess:
    """The review pages follow the staff roles, not Django's model permissions: every
    role (with ``is_staff``) views them, and ``write_roles`` add and change. What an
    action may do is still decided by ``rollout.transitions`` and ``rollout.incidents``."""

    write_roles: frozenset[str] = frozenset()

    def has_module_permission(self, request):
        return can_read_all(request.user) or super().has_module_permission(request)

    def has_view_permission(self, request, obj=None):
        return can_read_all(request.user) or super().has_view_permission(request, obj)

    def _writes(self, request) -> bool:
        return bool(self.write_roles & staff_roles(request.user))

    def has_add_permission(self, request, *args):
        return self._writes(request) or super().has_add_permission(request, *args)

    def has_change_permission(self, request, obj=None):
        return self._writes(request) or super().has_change_permission(request, obj)


@admin.register(Release)
class ReleaseAdmin(RoleAccess, AuditedModelAdmin):
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
    )

    write_roles = frozenset({ROLLOUT_ADMIN})
    actions = ["pause", "resume", "rollback"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def _with_reason(self, request, queryset, action: str, verb: str, change):
        """Ask for the reason on an intermediate page, then apply ``change`` to each
        selected release through ``rollout.transitions`` (audited, rollout admins only)."""
        reason = " ".join(request.POST.get("reason", "").split())
        if "apply" in request.POST and reason:
            for release in queryset:
                try:
                    transition = change(release, actor=request.user, reason=reason)
                except Refused as refused:
                    self.message_user(request, f"{release}: {refused.message}", messages.ERROR)
                    continue
                if transition is None:
                    self.message_user(request, f"{release}: nothing to do", messages.WARNING)
                else:
                    self.message_user(
                        request,
                        f"{release}: {transition.kind} done ({transition.from_stage} "
                        f"{transition.from_state} -> {transition.to_stage} {transition.to_state})",
                        messages.SUCCESS,
                    )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": f"{verb.capitalize()} releases",
            "releases": queryset,
            "action": action,
            "verb": verb,
            "reason": reason,
            "error": "A reason is required." if "apply" in request.POST else "",
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rollout/release/transition_reason.html", context)

    @admin.action(description="Pause the selected releases (asks for a reason)")
    def pause(self, request, queryset):
        return self._with_reason(request, queryset, "pause", "pause", transitions.pause)

    @admin.action(description="Resume the selected releases (asks for a reason)")
    def resume(self, request, queryset):
        return self._with_reason(request, queryset, "resume", "resume", transitions.resume)

    @admin.action(description="Roll the selected releases back one stage (asks for a reason)")
    def rollback(self, request, queryset):
        return self._with_reason(request, queryset, "rollback", "roll back", transitions.rollback)


@admin.register(RolloutPlan)
class RolloutPlanAdmin(RoleAccess, ReadOnlyAdmin):
    """Plan versions are immutable; apply new ones with ``manage.py apply_plan`` or the API."""

    list_display = ("release", "version", "digest", "comment", "created_by", "created_at")
    list_filter = ("release",)
    readonly_fields = [f.name for f in RolloutPlan._meta.fields]


@admin.register(StageTransition)
class StageTransitionAdmin(RoleAccess, ReadOnlyAdmin):
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
class ReviewAdmin(RoleAccess, ReadOnlyAdmin):
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
class ApprovalAdmin(RoleAccess, ReadOnlyAdmin):
    list_display = ("review", "reviewer", "verdict", "stage", "created_at")
    list_filter = ("verdict",)
    readonly_fields = [f.name for f in Approval._meta.fields]


class IncidentForm(forms.ModelForm):
    """Refuses on the form what ``file_incident`` and ``resolve_incident`` would refuse
    in ``save_model``, where a refusal can only be a server error."""

    def clean(self):
        cleaned = super().clean()
        release, stage = cleaned.get("release"), cleaned.get("stage")
        plan = release.active_plan if release is not None else None
        if stage and plan is not None and plan_doc(plan).stage(stage) is None:
            self.add_error("stage", f"{release.name}'s plan has no stage {stage!r}.")
        resolving = cleaned.get("status") == IncidentStatus.RESOLVED
        if resolving and not cleaned.get("resolution", "").strip():
            self.add_error("resolution", "Say how the incident was resolved.")
        return cleaned


@admin.register(Incident)
class IncidentAdmin(RoleAccess, AuditedModelAdmin):
    """Filing here is the same as through the API (audited, incident tripwires run at
    once). To resolve, set the status to resolved and say how in the resolution."""

    form = IncidentForm
    write_roles = frozenset({REVIEWER, ROLLOUT_ADMIN})
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
