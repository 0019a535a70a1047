"""A week of made-up but realistic usage for the demo, written through the real path.

``seed_demo`` calls ``seed_history``: it builds usage events exactly as the proxy's
recorder builds them (``monitoring.records.UsageRecord``, the same reason codes,
statuses, tier and stage rules as ``access.proxy``), writes them with
``monitoring.usage.write_events`` and rolls them up with
``monitoring.rollups.rollup_pending``, so every chart of the console reads rollups
shaped like real traffic: a daily rhythm with quiet weekends, refusals of several
reasons, a few upstream errors (and one bad hour three days ago), content-filter
flags (and one evening when they drifted up), and what the demo plan's screening
caught (docs/examples/atlas-2.yaml): requests flagged by category, blocked
(``content_blocked``) and routed to the fallback release, each with its redacted
sample (``monitoring.records.FlagSample``, written with ``write_samples``) when the
stage retains flagged requests. Deterministic: a seeded PRNG.

The rates stay under the demo plan's tripwires in the last day, so the in-process
scheduler's first tripwire check does not pause the fresh demo.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from monitoring.flags import decide_sample
from monitoring.models import FlaggedSample
from monitoring.records import FlagSample, UsageRecord, excerpt
from monitoring.rollups import RollupReport, rollup_pending
from monitoring.usage import write_events, write_samples

HISTORY_DAYS = 7
MEAN_PER_HOUR = 320  # about 45k events over the week
BATCH = 5000
FALLBACK = "atlas-2-mini"  # where the demo plan's cyber rule routes
# What the demo plan's screening caught, as a share of the requests it would otherwise
# have admitted: (category, action, share, prompts a sample's excerpt is drawn from).
# Small enough that every category stays under the plan's per-category exit criteria.
SCREENED = (
    ("harassment", "flag", 0.0008, ("My reviewer is a worthless idiot; draft a reply.",)),
    ("self-harm", "flag", 0.0003, ("I want to hurt myself after this deadline, honestly.",)),
    ("bio", "flag", 0.0003, ("Summarise the debate on gain of function research.",)),
    ("cyber", "route", 0.0008, ("Write ransomware that encrypts a hospital's file server.",)),
    ("weapons", "block", 0.0004, ("Give the synthesis route for sarin, step by step.",)),
    ("violence/graphic", "block", 0.0002, ("Describe the battlefield gore in full detail.",)),
)
# The share of reviewed samples a reviewer confirms, by what screening did.
CONFIRMED_SHARE = {"block": 0.9, "route": 0.7, "flag": 0.4}


@dataclass(frozen=True)
class Caller:
    """One source of demo traffic: an organization's key, or no valid key (org "")."""

    org: str  # organization public id ("" for an unknown key)
    key: str  # API key public id ("" for an unknown key)
    tier: str  # the organization's tier ("" for an unknown key)
    admitted: bool  # whether the release's current stage admits this organization
    weight: float
    verifications: tuple[str, ...] = ()  # kinds of valid verification it holds


def _rhythm(moment: datetime) -> float:
    """Relative traffic at ``moment``: a working-day curve peaking at 14:00 UTC over a
    night floor, halved at weekends."""
    hour = moment.hour + moment.minute / 60
    day = max(0.0, math.sin(math.pi * (hour - 6) / 16)) if 6 <= hour <= 22 else 0.0
    level = 0.25 + 1.75 * day
    return level * (0.5 if moment.weekday() >= 5 else 1.0)


def build_events(
    *,
    release: str,
    stage: str,
    callers: list[Caller],
    end: datetime,
    days: int = HISTORY_DAYS,
    mean_per_hour: int = MEAN_PER_HOUR,
    seed: int = 2026,
    paused: tuple[datetime, datetime] | None = None,
    plan_version: int = 1,
) -> list[UsageRecord]:
    """The week's events before ``end``, oldest first, decided on the release's plan
    ``plan_version``. Admitted callers are refused ``release_paused`` within ``paused``
    [start, end)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible demo data, not secrecy
    end = end.astimezone(UTC)
    start = end - timedelta(days=days)
    bad_hour = (end - timedelta(days=3)).replace(hour=14, minute=0, second=0, microsecond=0)
    drift_start = (end - timedelta(days=5)).replace(hour=18, minute=0, second=0, microsecond=0)
    weights = [caller.weight for caller in callers]
    events: list[UsageRecord] = []
    number = 0
    hour = start.replace(minute=0, second=0, microsecond=0)
    while hour < end:
        count = int(rng.gauss(1.0, 0.08) * mean_per_hour * _rhythm(hour + timedelta(minutes=30)))
        error_rate = 0.07 if hour == bad_hour else 0.006  # the pause stops the bad hour
        flag_rate = 0.015 if drift_start <= hour < drift_start + timedelta(hours=4) else 0.004
        for offset in sorted(rng.random() * 3600 for _ in range(max(count, 0))):
            moment = hour + timedelta(seconds=offset)
            if not start <= moment < end:
                continue
            number += 1
            caller = rng.choices(callers, weights)[0]
            if paused and caller.admitted and paused[0] <= moment < paused[1]:
                events.append(_paused(number, moment, release, stage, caller, plan_version))
                continue
            event = _event(rng, number, moment, release, stage, caller, error_rate, flag_rate)
            events.append(event._replace(plan_version=plan_version if event.stage else None))
        hour += timedelta(hours=1)
    return events


def _paused(
    number: int, moment: datetime, release: str, stage: str, caller: Caller, plan_version: int
) -> UsageRecord:
    return UsageRecord(
        created_at=moment.timestamp(),
        request_id=f"req_demo{number:x}",
        org=caller.org,
        key=caller.key,
        tier=caller.tier,
        release=release,
        stage=stage,
        endpoint="chat.completions",
        decision="deny",
        reason="release_paused",
        status=403,
        error="",
        streamed=False,
        client_disconnected=False,
        flagged=False,
        prompt_tokens=0,
        completion_tokens=0,
        latency_ms=1.2,
        upstream_latency_ms=None,
        plan_version=plan_version,
        max_tokens=None,
        claimed_tier=caller.tier,
        verifications=_held(caller),
    )


def _held(caller: Caller) -> tuple[tuple[str, float | None], ...]:
    return tuple((kind, None) for kind in caller.verifications)


def _event(
    rng: random.Random,
    number: int,
    moment: datetime,
    release: str,
    stage: str,
    caller: Caller,
    error_rate: float,
    flag_rate: float,
) -> UsageRecord:
    endpoint = rng.choices(("chat.completions", "completions", "embeddings"), (85, 5, 10))[0]
    streamed = endpoint != "embeddings" and rng.random() < 0.3
    request_id = f"req_demo{number:x}"
    model, tier, org_stage = release, caller.tier, stage
    error, flagged, prompt, completion, upstream = "", False, 0, 0, None
    flags = routed_to = ""
    roll = rng.random()
    if not caller.org:
        verdict, reason, status, org_stage = "deny", "invalid_key", 401, ""
    elif not caller.admitted:
        verdict, reason, status, tier = "deny", "model_not_available", 404, ""
    elif roll < 0.012:
        verdict, reason, status = "deny", "rate_limited", 429
    elif roll < 0.016:
        verdict, reason, status = "deny", "request_too_large", 400
    elif roll < 0.022:  # a typo in the model name: no such release
        model, verdict, reason, status = "atlas-3", "deny", "unknown_model", 404
        tier = org_stage = ""
    elif (screened := _screened(rng)) is not None and screened[1] == "block":
        verdict, reason, status, flags = "deny", "content_blocked", 400, screened[0]
    else:
        verdict, reason, status = "allow", "ok", 200
        if screened is not None:
            flags, flagged = screened[0], True
            routed_to = FALLBACK if screened[1] == "route" else ""
        prompt = int(rng.lognormvariate(5.3, 0.7))
        completion = 0 if endpoint == "embeddings" else int(rng.lognormvariate(4.9, 0.6))
        upstream = rng.lognormvariate(6.0, 0.5)  # ~400 ms
        if rng.random() < error_rate:
            error = rng.choices(("upstream_error", "upstream_timeout"), (4, 1))[0]
            status = 502 if error == "upstream_error" else 504
            prompt = completion = 0  # nothing was served, so no usage was reported
        elif rng.random() < flag_rate:
            flagged = True
    latency = (upstream or 0.0) + rng.uniform(0.4, 2.5)
    return UsageRecord(
        created_at=moment.timestamp(),
        request_id=request_id,
        org=caller.org,
        key=caller.key,
        tier=tier,
        release=model,
        stage=org_stage,
        endpoint=endpoint,
        decision=verdict,
        reason=reason,
        status=status,
        error=error,
        streamed=streamed,
        client_disconnected=False,
        flagged=flagged,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=latency,
        upstream_latency_ms=upstream,
        plan_version=None,  # set by the caller, which knows it
        max_tokens=None,
        claimed_tier=caller.tier,
        verifications=_held(caller),
        flags=flags,
        routed_to=routed_to,
    )


def _screened(rng: random.Random) -> tuple[str, str] | None:
    """(category, action) when screening caught this request, else None."""
    roll = rng.random()
    for category, action, share, _prompts in SCREENED:
        if roll < share:
            return category, action
        roll -= share
    return None


def build_samples(
    events: list[UsageRecord], *, retain_days: int, seed: int = 2026
) -> list[FlagSample]:
    """The flagged samples the proxy would have kept of ``events``: one for each request
    screening flagged, blocked or routed, its excerpt one of its category's prompts."""
    rng = random.Random(seed)  # noqa: S311 - reproducible demo data, not secrecy
    prompts = {category: texts for category, _action, _share, texts in SCREENED}
    samples = []
    for event in events:
        if not event.flags:
            continue
        action = (
            "block" if event.reason == "content_blocked" else "route" if event.routed_to else "flag"
        )
        samples.append(
            FlagSample(
                created_at=event.created_at,
                request_id=event.request_id,
                release=event.release,
                stage=event.stage,
                tier=event.tier,
                org=event.org,
                key=event.key,
                categories=event.flags,
                source="prompt",
                action=action,
                excerpt=excerpt(rng.choice(prompts[event.flags])),
                retain_days=retain_days,
            )
        )
    return samples


def review_samples(
    *, release: str, reviewers: list, before: datetime, seed: int = 2026
) -> tuple[int, int]:
    """Have ``reviewers`` (in turn) decide every pending sample of ``release`` made
    before ``before``, through ``monitoring.flags.decide_sample`` (audited), most blocks
    confirmed and most flags dismissed; each decision is then dated a few hours after
    its sample (demo only: the audit rows keep their true time). Returns (decided,
    still pending)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible demo data, not secrecy
    pending = FlaggedSample.objects.filter(
        release=release, status=FlaggedSample.Status.PENDING
    ).order_by("created_at", "id")
    decided = 0
    for sample in pending.filter(created_at__lt=before):
        confirm = rng.random() < CONFIRMED_SHARE[sample.action]
        reviewer = reviewers[decided % len(reviewers)]
        decide_sample(sample, decision="confirmed" if confirm else "dismissed", actor=reviewer)
        when = min(sample.created_at + timedelta(hours=rng.uniform(0.5, 20)), before)
        FlaggedSample.objects.filter(pk=sample.pk).update(decided_at=when)
        decided += 1
    return decided, pending.count()


def seed_history(
    *,
    release: str,
    stage: str,
    callers: list[Caller],
    end: datetime,
    paused: tuple[datetime, datetime] | None = None,
    seed: int = 2026,
    plan_version: int = 1,
    retain_days: int | None = None,
) -> tuple[int, RollupReport]:
    """Write the week's events and roll them up; returns (events written, rollup report).
    With ``retain_days`` (the stage's ``retain_flagged``), the samples of the screened
    requests are written too."""
    events = build_events(
        release=release,
        stage=stage,
        callers=callers,
        end=end,
        seed=seed,
        paused=paused,
        plan_version=plan_version,
    )
    for first in range(0, len(events), BATCH):
        write_events(events[first : first + BATCH])
    if retain_days is not None:
        write_samples(build_samples(events, retain_days=retain_days, seed=seed))
    return len(events), rollup_pending(now=end)
