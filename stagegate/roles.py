"""Who may do what. Staff roles are Django groups; org_admin is a membership role.

- rollout_admin: manages releases, plans, organizations, verifications, keys.
- reviewer: reads everything; approves stage reviews (later).
- viewer: reads everything, changes nothing.
- org_admin: sees and manages only their own organizations' keys and members.

Anyone else is refused (deny by default).
"""

from __future__ import annotations

from django.db.models import QuerySet

ROLLOUT_ADMIN = "rollout_admin"
REVIEWER = "reviewer"
VIEWER = "viewer"
STAFF_ROLES = (ROLLOUT_ADMIN, REVIEWER, VIEWER)


def staff_roles(user) -> frozenset[str]:
    """The user's staff roles, cached on the user object for the request."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return frozenset()
    cached = getattr(user, "_stagegate_roles", None)
    if cached is None:
        names = set(user.groups.filter(name__in=STAFF_ROLES).values_list("name", flat=True))
        if user.is_superuser:
            names.add(ROLLOUT_ADMIN)
        cached = frozenset(names)
        user._stagegate_roles = cached
    return cached


def is_rollout_admin(user) -> bool:
    return ROLLOUT_ADMIN in staff_roles(user)


def can_read_all(user) -> bool:
    """Staff of any role read every organization's records."""
    return bool(staff_roles(user))


def admin_org_ids(user) -> QuerySet:
    """Ids of organizations the user administers as org_admin."""
    from access.models import Membership, MembershipRole  # the org_admin membership

    return Membership.objects.filter(
        user=user, user__is_active=True, role=MembershipRole.ORG_ADMIN
    ).values("organization_id")
