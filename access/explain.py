"""Why may (or may not) an organization or a key use a release: the access explainer.

The answer is the proxy's own: the same ``access.decisions.decide`` fed the same
entries the proxy's snapshot holds (``access.snapshot`` loads them, one object at a
time here), so the console cannot disagree with the proxy. It also says what the
release's next stage in its active plan would decide, and what that changes.

An organization asked about without a key stands for "any usable key of it": a key
that is neither revoked nor expired. A key id asked about is looked up exactly as
the proxy looks one up (its non-secret id); the secret is never needed nor taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from access.decisions import Decision, KeyEntry, OrgEntry, RequestInfo, decide
from access.snapshot import load_key, load_org, release_entry
from rollout.models import Release, ReleaseState
from rollout.plans import plan_doc
from stagegate import keyformat

# The limits a decision carries, in the order the explainer shows them.
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_tokens",
    "streaming",
)


@dataclass(frozen=True)
class Explanation:
    subject: str  # what was asked about: an organization's slug, or a key's prefix
    release: Release
    org: OrgEntry | None
    key: KeyEntry | None
    now: Decision
    next_stage: str | None  # None: the release is in its plan's last stage (or not served)
    next: Decision | None
    assumed_active: bool  # the next stage was judged as if the release were active
    changes: list[str] = field(default_factory=list)  # what the next stage changes, in words

    @property
    def key_expires_at(self) -> datetime | None:
        if self.key is None or self.key.expires_at is None:
            return None
        return datetime.fromtimestamp(self.key.expires_at, tz=UTC)


def limits_table(decision: Decision | None) -> list[tuple[str, object]]:
    """(limit, value) pairs of the decision's limits; empty when it carries none."""
    if decision is None or decision.limits is None:
        return []
    return [(name, getattr(decision.limits, name)) for name in LIMIT_FIELDS]


def _changes(now: Decision, later: Decision) -> list[str]:
    changes = []
    if now.reason != later.reason:
        changes.append(f"decision: {now.reason} → {later.reason}")
    if now.tier != later.tier:
        changes.append(f"tier: {now.tier or '—'} → {later.tier or '—'}")
    before, after = dict(limits_table(now)), dict(limits_table(later))
    for name in LIMIT_FIELDS:
        if before.get(name) != after.get(name):
            changes.append(f"{name}: {before.get(name, '—')} → {after.get(name, '—')}")
    return changes


def explain_access(
    *,
    release: Release,
    organization_pk: int | None = None,
    key_id: str | None = None,
    at: float | None = None,
) -> Explanation:
    """The proxy's decision for ``release`` now and at its next stage, for one key (by
    its key id, without ``sgk_``) or for any usable key of one organization."""
    if (organization_pk is None) == (key_id is None):
        raise ValueError("explain_access needs exactly one of organization_pk and key_id")
    now = time.time() if at is None else at
    if key_id is not None:
        key = load_key(key_id)
        org = load_org(key.org_id) if key is not None else None
        subject = f"{keyformat.PREFIX}{key_id}"
    else:
        org = load_org(organization_pk)
        key = None
        if org is not None:  # any usable key of the organization
            key = KeyEntry(
                key_id="", public_id="", digest="", org_id=organization_pk,
                expires_at=None, revoked=False,
            )  # fmt: skip
        subject = org.slug if org is not None else "?"
    request = RequestInfo("access")

    def judged(entry) -> Decision:
        return decide(key=key, org=org, release=entry, model=release.name, request=request, now=now)

    current = judged(release_entry(release))
    next_stage, later, assumed_active = None, None, False
    if release.active_plan is not None and release.state != ReleaseState.RETIRED:
        doc = plan_doc(release.active_plan)
        if doc.stage(release.current_stage) is not None:
            next_stage = doc.next_stage(release.current_stage)
    if next_stage is not None:
        # An advance happens only to an active release; judge the next stage so.
        assumed_active = release.state != ReleaseState.ACTIVE
        later = judged(release_entry(release, stage=next_stage, state=ReleaseState.ACTIVE))
    return Explanation(
        subject=subject,
        release=release,
        org=org,
        key=key if key_id is not None else None,
        now=current,
        next_stage=next_stage,
        next=later,
        assumed_active=assumed_active,
        changes=_changes(current, later) if later is not None else [],
    )
