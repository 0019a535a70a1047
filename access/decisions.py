"""The decision engine: may this key make this request to this model, now?

``decide`` is a pure function over plain, immutable data (a key, its organization,
a release with its current stage policy, a summary of the request, the time). It
touches no database, cache or clock, so the proxy runs it from an in-memory
snapshot, and ``/v1/models``, ``/v1/models/{id}``, ``/v1/access``, the calls
themselves and the gateway authorization endpoint all share it: listing and
calling cannot disagree.

Rate limits and quotas are counters, not policy: the limiter (``access.ratelimits``)
applies the limits a decision returns and may turn an allow into ``rate_limited``
or ``quota_exceeded``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from access.tiers import effective_tier
from rollout.plan_schema import StagePolicy, TierLimits

if TYPE_CHECKING:
    from access.screening import Screen


class Reason(StrEnum):
    """Stable reason codes. Clients and telemetry rely on them; never rename one."""

    OK = "ok"
    INVALID_KEY = "invalid_key"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_NOT_AVAILABLE = "model_not_available"
    VERIFICATION_REQUIRED = "verification_required"
    RELEASE_PAUSED = "release_paused"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    CAPABILITY_NOT_ALLOWED = "capability_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"
    MODEL_HELD = "model_held"


# HTTP status per reason, chosen so the official openai client raises the exception
# a user expects: 401 AuthenticationError, 403 PermissionDeniedError, 404
# NotFoundError, 400 BadRequestError, 429 RateLimitError.
STATUS: dict[Reason, int] = {
    Reason.OK: 200,
    Reason.INVALID_KEY: 401,
    Reason.KEY_REVOKED: 401,
    Reason.KEY_EXPIRED: 401,
    Reason.UNKNOWN_MODEL: 404,
    Reason.MODEL_NOT_AVAILABLE: 404,
    Reason.VERIFICATION_REQUIRED: 403,
    Reason.RELEASE_PAUSED: 403,
    Reason.RATE_LIMITED: 429,
    Reason.QUOTA_EXCEEDED: 429,
    Reason.CAPABILITY_NOT_ALLOWED: 403,
    Reason.REQUEST_TOO_LARGE: 400,
    Reason.MODEL_HELD: 403,
}

# What the caller is told. A model its tier may not use is invisible: the answer is
# word for word the one for a model that does not exist, so a refusal cannot be
# used to learn which models are in a preview. The true reason is still recorded.
PUBLIC_REASON: dict[Reason, Reason] = {Reason.MODEL_NOT_AVAILABLE: Reason.UNKNOWN_MODEL}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What the proxy knows about one API key (no secret: ``digest`` is a SHA-256)."""

    key_id: str
    public_id: str
    digest: str
    org_id: int
    expires_at: float | None  # POSIX seconds
    revoked: bool


@dataclass(frozen=True, slots=True)
class OrgEntry:
    """An organization, its claimed tier and its verifications with status valid."""

    public_id: str
    slug: str
    tier: str
    verifications: tuple[tuple[str, float | None], ...] = ()  # (kind, expires_at)

    def valid_kinds(self, now: float) -> frozenset[str]:
        return frozenset(
            kind
            for kind, expires_at in self.verifications
            if expires_at is None or now < expires_at
        )


@dataclass(frozen=True, slots=True)
class ReleaseEntry:
    """A release as the proxy serves it: its state, current stage and upstream."""

    name: str
    public_id: str
    state: str  # active | paused | retired
    stage: StagePolicy
    upstream_base_url: str
    upstream_model: str
    plan_version: int
    created: int  # POSIX seconds, for /v1/models
    screen: Screen | None = None  # the stage's screening compiled (access.screening)
    # A tuned model (tuning.models.TunedModel) is served as a release of its own: its
    # parent's name (whose cohort it shares), and why it may not be called yet ("" when
    # it may: assessed and passed, or released by reviewers).
    parent: str | None = None
    held: str = ""

    @property
    def stage_name(self) -> str:
        return self.stage.name


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the decision needs to know about the request itself."""

    endpoint: str  # chat.completions | completions | embeddings | models | access | authz
    stream: bool = False
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    message: str
    tier: str | None = None  # the effective tier the request is served under
    stage: str | None = None
    limits: TierLimits | None = None

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.OK

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    @property
    def public_reason(self) -> Reason:
        return PUBLIC_REASON.get(self.reason, self.reason)

    @property
    def visible(self) -> bool:
        """False when the caller must not learn that the model exists."""
        return self.public_reason is not Reason.UNKNOWN_MODEL


def not_found_message(model: str) -> str:
    return f"The model '{model}' does not exist or you do not have access to it."


def key_refusal(key: KeyEntry | None, now: float) -> Decision | None:
    """The refusal for a missing, revoked or expired key, or None for a usable key."""
    if key is None:
        return Decision(Reason.INVALID_KEY, "Invalid API key: not recognised.")
    if key.revoked:
        return Decision(Reason.KEY_REVOKED, "This API key has been revoked.")
    if key.expires_at is not None and now >= key.expires_at:
        return Decision(Reason.KEY_EXPIRED, "This API key has expired.")
    return None


def decide(
    *,
    key: KeyEntry | None,
    org: OrgEntry | None,
    release: ReleaseEntry | None,
    model: str,
    request: RequestInfo,
    now: float,
) -> Decision:
    """Allow or refuse one request, with a stable reason and the limits that apply.

    ``key`` is None when the presented key is malformed, unknown or its secret does
    not match. ``release`` is None when no release is called ``model``.
    """
    refused = key_refusal(key, now)
    if refused is not None:
        return refused
    if org is None:  # a key whose organization is gone: treat as an unknown key
        return Decision(Reason.INVALID_KEY, "Invalid API key: not recognised.")
    if release is None or release.state == "retired":
        return Decision(Reason.UNKNOWN_MODEL, not_found_message(model))

    stage = release.stage
    stage_name = stage.name
    if (
        org.tier not in stage.tiers
        or org.slug in stage.deny_orgs
        or (stage.allow_orgs is not None and org.slug not in stage.allow_orgs)
        or not stage.in_cohort(release.parent or release.name, org.slug)
    ):
        return Decision(Reason.MODEL_NOT_AVAILABLE, not_found_message(model), stage=stage_name)

    kinds = org.valid_kinds(now)
    tier = str(effective_tier(org.tier, kinds, stage))
    if tier not in stage.tiers or not set(stage.tiers[tier].verifications) <= kinds:
        missing = sorted(set(stage.tiers[org.tier].verifications) - kinds)
        return Decision(
            Reason.VERIFICATION_REQUIRED,
            f"'{model}' at stage '{stage_name}' needs a valid {', '.join(missing)} verification"
            f" for tier {org.tier}; your organization's is missing or expired.",
            tier=tier,
            stage=stage_name,
        )
    limits = stage.tiers[tier].limits
    if release.state == "paused":
        return Decision(
            Reason.RELEASE_PAUSED,
            f"'{model}' is paused by its rollout; try again later.",
            tier=tier,
            stage=stage_name,
            limits=limits,
        )
    if release.held:
        return Decision(Reason.MODEL_HELD, release.held, tier=tier, stage=stage_name, limits=limits)
    if request.stream and not limits.streaming:
        return Decision(
            Reason.CAPABILITY_NOT_ALLOWED,
            f"Streaming is not allowed for tier {tier} at stage '{stage_name}'.",
            tier=tier,
            stage=stage_name,
            limits=limits,
        )
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens:
        return Decision(
            Reason.REQUEST_TOO_LARGE,
            f"max_tokens {request.max_tokens} is above this tier's limit of"
            f" {limits.max_tokens} at stage '{stage_name}'.",
            tier=tier,
            stage=stage_name,
            limits=limits,
        )
    return Decision(Reason.OK, "allowed", tier=tier, stage=stage_name, limits=limits)
