"""Who may open a console page or take an action, checked on every request.

Roles come from ``stagegate.roles`` (the same checks the REST API and the admin use)
and are read fresh for each request, so a role taken away takes effect on the next
one. A page refuses in the way that reveals least:

- anonymous: redirected to the login page;
- signed in with no role at all: 403, with a page that says so;
- an action the user's role does not allow: 403, saying which role it needs;
- an object of an organization an org admin does not administer: 404, exactly as if
  it did not exist (``org_ids``, ``scoped``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.views.decorators.http import require_POST

from stagegate.permissions import narrow_to_orgs
from stagegate.roles import (
    REVIEWER,
    ROLLOUT_ADMIN,
    admin_org_ids,
    can_read_all,
    staff_roles,
)


def is_org_admin(user) -> bool:
    return admin_org_ids(user).exists()


def has_console_access(user) -> bool:
    """Staff of any role, or an org admin."""
    return can_read_all(user) or is_org_admin(user)


def org_ids(user) -> QuerySet | None:
    """The organizations ``user`` may see: None for every one (staff), else those they
    administer."""
    return None if can_read_all(user) else admin_org_ids(user)


def scoped(queryset: QuerySet, user, field: str = "organization") -> QuerySet:
    """``queryset`` narrowed to the organizations ``user`` may see."""
    return narrow_to_orgs(queryset, org_ids(user), field)


def console_page(view: Callable) -> Callable:
    """A page for anyone with a role (staff or org admin)."""

    @login_required
    @wraps(view)
    def guarded(request, *args, **kwargs):
        if not has_console_access(request.user):
            raise PermissionDenied("Your account has no role in Stagegate yet.")
        return view(request, *args, **kwargs)

    return guarded


def console_action(view: Callable) -> Callable:
    """A POST-only action for anyone with a role; which organization it touches, and
    whether the user may, is the view's question (an org admin's own organizations)."""
    return console_page(require_POST(view))


def staff_page(view: Callable) -> Callable:
    """A page for staff of any role (rollout admin, reviewer, viewer)."""

    @login_required
    @wraps(view)
    def guarded(request, *args, **kwargs):
        if not can_read_all(request.user):
            raise PermissionDenied("This page is for Stagegate staff.")
        return view(request, *args, **kwargs)

    return guarded


def action(*roles: str) -> Callable[[Callable], Callable]:
    """A POST-only action for users holding one of ``roles``."""

    def decorate(view: Callable) -> Callable:
        @login_required
        @require_POST
        @wraps(view)
        def guarded(request, *args, **kwargs):
            if not set(roles) & staff_roles(request.user):
                raise PermissionDenied(f"This needs the {' or '.join(roles)} role.")
            return view(request, *args, **kwargs)

        return guarded

    return decorate


rollout_admin_action = action(ROLLOUT_ADMIN)
reviewer_action = action(REVIEWER)
