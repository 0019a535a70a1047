"""DRF permission classes. Object visibility is enforced by each view's queryset
(an object outside it is a 404, never a 403 that would confirm it exists)."""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from access.roles import can_read_all, is_rollout_admin, staff_roles


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
        user = request.user
        if not getattr(user, "is_authenticated", False):
            return False
        from access.roles import admin_org_ids

        roles = staff_roles(user)
        is_org_admin = admin_org_ids(user).exists()
        if request.method in SAFE_METHODS:
            return bool(roles) or is_org_admin
        return is_rollout_admin(user) or is_org_admin
