"""DRF permission classes, and the organization scope that goes with them.

Permission classes answer "may this user use this endpoint at all"; which objects
they may touch is the view's queryset, narrowed with ``scope_to_orgs`` (an object
outside it is a 404, never a 403 that would confirm it exists).
"""

from __future__ import annotations

from django.db.models import QuerySet
from rest_framework.permissions import SAFE_METHODS, BasePermission

from stagegate.roles import (
    REVIEWER,
    ROLLOUT_ADMIN,
    admin_org_ids,
    can_read_all,
    is_rollout_admin,
    staff_roles,
)


def _is_org_admin(user) -> bool:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return admin_org_ids(user).exists()


class DenyAll(BasePermission):
    """The default for any view that does not declare its own permissions."""

    def has_permission(self, request, view) -> bool:
        return False


class StaffReadAdminWrite(BasePermission):
    """Staff of any role read; only rollout admins write."""

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return can_read_all(request.user)
        return is_rollout_admin(request.user)


class StaffOrOrgAdmin(BasePermission):
    """Staff, or an org admin (whose queryset is limited to their organizations).
    Writes need rollout_admin or org_admin; reviewers and viewers only read."""

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return can_read_all(request.user) or _is_org_admin(request.user)
        return is_rollout_admin(request.user) or _is_org_admin(request.user)


class IsStaff(BasePermission):
    """Staff of any role, for any method (for endpoints that change nothing, such
    as validating a plan, but are POSTed)."""

    def has_permission(self, request, view) -> bool:
        return can_read_all(request.user)


class IsRolloutAdmin(BasePermission):
    def has_permission(self, request, view) -> bool:
        return is_rollout_admin(request.user)


class OrgScopedAdminWrite(StaffOrOrgAdmin):
    """Staff read everything and org admins their own organizations' objects; only
    rollout admins write.

    An org admin's write passes ``has_permission`` so that the view's scoped
    queryset answers first: an object of another organization is a 404, exactly as
    if it did not exist, and only an object of their own is refused here (403).
    Reviewers and viewers are refused every write at once.
    """

    def has_object_permission(self, request, view, obj) -> bool:
        return request.method in SAFE_METHODS or is_rollout_admin(request.user)


def org_scope(request) -> QuerySet | None:
    """The organization ids the request may touch, or None for every organization.

    Rollout admins touch every organization; other staff read every organization;
    an org admin reads and writes only the organizations they administer. A
    reviewer who is also an org admin writes only to their own organizations.
    """
    user = request.user
    if is_rollout_admin(user):
        return None
    if request.method in SAFE_METHODS and can_read_all(user):
        return None
    return admin_org_ids(user)


def narrow_to_orgs(queryset: QuerySet, ids: QuerySet | None, field: str = "organization"):
    """``queryset`` narrowed to the organization ids ``ids`` (None: all of them)."""
    if ids is None:
        return queryset
    lookup = "pk__in" if field == "pk" else f"{field}__in"
    return queryset.filter(**{lookup: ids})


def scope_to_orgs(queryset: QuerySet, request, field: str = "organization") -> QuerySet:
    """``queryset`` narrowed to the organizations the request may touch."""
    return narrow_to_orgs(queryset, org_scope(request), field)


class IsReviewer(BasePermission):
    """Users with the reviewer role (approving and rejecting reviews)."""

    def has_permission(self, request, view) -> bool:
        return REVIEWER in staff_roles(request.user)


class StaffReadReviewerOrAdminWrite(BasePermission):
    """Staff of any role read; reviewers and rollout admins write (request a review,
    file or resolve an incident); viewers only read."""

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return can_read_all(request.user)
        return bool({REVIEWER, ROLLOUT_ADMIN} & staff_roles(request.user))
