"""What every console template knows about the signed-in user: their roles and the
pages their roles open (the navigation)."""

from __future__ import annotations

from functools import cache

from django.urls import NoReverseMatch, reverse

from stagegate.roles import REVIEWER, ROLLOUT_ADMIN, staff_roles

# (URL name, label, who sees it: "staff" or "all" console users)
NAV = (
    ("board", "Board", "staff"),
    ("reviews", "Reviews", "staff"),
    ("orgs", "Organizations", "all"),
    ("keys", "Keys", "all"),
    ("access", "Access", "staff"),
    ("incidents", "Incidents", "staff"),
    ("flags", "Flags", "staff"),
    ("tuning", "Fine-tuning", "staff"),
    ("usage", "Usage", "staff"),
    ("audit", "Audit", "staff"),
)


@cache
def _routed() -> tuple[tuple[str, str, str], ...]:
    """The NAV entries whose page exists."""
    found = []
    for name, label, audience in NAV:
        try:
            reverse(f"console:{name}")
        except NoReverseMatch:
            continue
        found.append((name, label, audience))
    return tuple(found)


def console(request) -> dict:
    user = getattr(request, "user", None)
    roles = staff_roles(user) if user is not None else frozenset()
    return {
        "roles": sorted(roles),
        "is_staff_role": bool(roles),
        "is_rollout_admin": ROLLOUT_ADMIN in roles,
        "is_reviewer": REVIEWER in roles,
        "console_nav": [
            (name, label) for name, label, audience in _routed() if roles or audience == "all"
        ],
    }
