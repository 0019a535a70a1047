"""May this key fine-tune this release now, with this file?

A pure function over the same plain data the proxy decides calls from
(``access.decisions``): the key, its organization, the release at its current stage.
Who may *call* a release is decided first, by ``decide`` itself, so a model the caller
cannot see stays invisible here too (404, word for word a model that does not exist).
Then the stage's ``fine_tuning`` says whether the caller's effective tier may
fine-tune, and with which row, byte and daily job limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from access.decisions import (
    KeyEntry,
    OrgEntry,
    ReleaseEntry,
    RequestInfo,
    decide,
)
from rollout.plan_schema import FineTuningLimits

# Refusal codes of the fine-tuning routes, besides the decision's own reasons. Stable:
# clients rely on them.
FINE_TUNING_NOT_ALLOWED = "fine_tuning_not_allowed"
DATASET_TOO_LARGE = "dataset_too_large"
JOBS_EXCEEDED = "fine_tuning_jobs_exceeded"
NOT_A_BASE_MODEL = "not_a_base_model"


@dataclass(frozen=True, slots=True)
class TuningDecision:
    """Allowed (``code == "ok"``) or refused with a stable code, an HTTP status and a
    sentence saying why; the effective tier, stage and limits that applied."""

    code: str
    status: int
    message: str
    tier: str | None = None
    stage: str | None = None
    limits: FineTuningLimits | None = None

    @property
    def allowed(self) -> bool:
        return self.code == "ok"


def decide_fine_tuning(
    *,
    key: KeyEntry | None,
    org: OrgEntry | None,
    release: ReleaseEntry | None,
    model: str,
    now: float,
    rows: int,
    size: int,
    jobs_today: int,
) -> TuningDecision:
    """Allow or refuse a fine-tuning job of ``model`` on a file of ``rows`` rows and
    ``size`` bytes, when the organization already created ``jobs_today`` jobs of this
    release in the last 24 hours."""
    called = decide(
        key=key,
        org=org,
        release=release,
        model=model,
        request=RequestInfo(endpoint="fine_tuning"),
        now=now,
    )
    if not called.allowed:
        return TuningDecision(
            called.public_reason.value, called.status, called.message, called.tier, called.stage
        )
    assert release is not None and called.tier is not None
    if release.parent is not None:
        return TuningDecision(
            NOT_A_BASE_MODEL,
            400,
            f"'{model}' is itself a tuned model; fine-tune its base release"
            f" '{release.parent}' instead.",
            called.tier,
            called.stage,
        )
    fine_tuning = release.stage.fine_tuning
    limits = fine_tuning.limits_for(called.tier) if fine_tuning is not None else None
    if limits is None:
        return TuningDecision(
            FINE_TUNING_NOT_ALLOWED,
            403,
            f"Tier {called.tier} may not fine-tune '{model}' at its current stage"
            f" '{called.stage}'.",
            called.tier,
            called.stage,
        )
    if rows > limits.max_rows or size > limits.max_bytes:
        return TuningDecision(
            DATASET_TOO_LARGE,
            400,
            f"The training file has {rows:,} rows and {size:,} bytes; tier {called.tier} may"
            f" fine-tune '{model}' at stage '{called.stage}' with at most"
            f" {limits.max_rows:,} rows and {limits.max_bytes:,} bytes.",
            called.tier,
            called.stage,
            limits,
        )
    if jobs_today >= limits.jobs_per_day:
        return TuningDecision(
            JOBS_EXCEEDED,
            429,
            f"Your organization created {jobs_today} fine-tuning jobs of '{model}' in the"
            f" last 24 hours; tier {called.tier} may create {limits.jobs_per_day} a day at"
            f" stage '{called.stage}'.",
            called.tier,
            called.stage,
            limits,
        )
    return TuningDecision("ok", 200, "allowed", called.tier, called.stage, limits)


def may_fine_tune_any(
    *, org: OrgEntry, releases: dict[str, ReleaseEntry], key: KeyEntry, now: float
) -> bool:
    """True when the organization may fine-tune at least one release as things stand:
    uploads of training files are refused to organizations that may fine-tune none."""
    for name, release in releases.items():
        if release.parent is None and release.stage.fine_tuning is not None:
            decision = decide_fine_tuning(
                key=key, org=org, release=release, model=name, now=now, rows=0, size=0,
                jobs_today=0,
            )  # fmt: skip
            if decision.allowed:
                return True
    return False
