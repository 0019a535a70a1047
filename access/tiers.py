"""Effective tier: the tier an organization's evidence supports at a stage.

An organization claims a tier, but at a given stage that tier counts only while
every verification the stage's policy asks of that tier is valid (status valid
and not past its expiry). Otherwise the organization is treated as ``public``.
Expiry is checked at the moment of the decision, so it takes effect at once; the
periodic sweep (``expire_verifications``) then records the change in the audit log.

Pure, like ``access.decisions`` which depends on it: no Django here. Reading an
organization's evidence and auditing tier changes live in ``access.tier_changes``.
"""

from __future__ import annotations

from collections.abc import Iterable

from rollout.plan_schema import StagePolicy, Tier

PUBLIC: Tier = "public"  # the tier an organization falls back to without the evidence


def effective_tier(claimed_tier: str, valid_kinds: Iterable[str], stage: StagePolicy) -> str:
    """Pure: the claimed tier if the stage's requirements for it are met, else public."""
    tier_policy = stage.tiers.get(claimed_tier)
    if tier_policy is None:
        return claimed_tier  # the stage sets no evidence for this tier (and does not admit it)
    if set(tier_policy.verifications) <= set(valid_kinds):
        return claimed_tier
    return PUBLIC


def tiers_by_release(
    claimed_tier: str, kinds: Iterable[str], policies: dict[str, StagePolicy]
) -> dict[str, str]:
    """Pure: release name -> effective tier, given each release's current stage policy."""
    return {name: effective_tier(claimed_tier, kinds, stage) for name, stage in policies.items()}
