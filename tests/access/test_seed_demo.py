from __future__ import annotations

import json
import re
import stat
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Sum
from django.utils import timezone

from access.explain import explain_access
from access.keys import authenticate_key
from access.management.commands.seed_demo import DEMO_ORGS, org_admin_username
from access.models import ApiKey, Organization
from access.tier_changes import effective_tiers_by_release
from monitoring.models import AuditEvent, FlaggedSample, UsageEvent, UsageRollup
from rollout.models import Release, Review, StageTransition
from rollout.plan_schema import TIERS
from rollout.plans import plan_doc
from rollout.reviews import evaluate
from stagegate.roles import admin_org_ids, staff_roles

KEY_LINE = re.compile(r"^\s+(\S+)\s+(\S+)\s+(sgk_\S+)$", re.MULTILINE)
USER_LINE = re.compile(
    r"^  (\S+)\s+(\S{16})\s+(rollout admin|reviewer|viewer|org admin of \S+)$", re.MULTILINE
)
SLUGS = [slug for slug, *_ in DEMO_ORGS]


def authenticate(*, username: str, password: str) -> User:
    """The user, once their password is checked (django-axes refuses authenticate()
    without a request)."""
    user = User.objects.get(username=username)
    assert user.check_password(password)
    return user


def seed(capsys, *args: str) -> str:
    call_command("seed_demo", *args)
    return capsys.readouterr().out


def test_seed_demo_creates_the_demo_world(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = seed(capsys, "--no-history")
    release = Release.objects.get(name="atlas-2")
    assert (release.current_stage, release.state, release.active_plan.version) == (
        "research_preview",
        "active",
        1,
    )
    orgs = dict(Organization.objects.values_list("slug", "tier"))
    assert orgs == {
        "northwind-research": "research_partner",
        "meridian-safety-lab": "research_partner",
        "oxbridge-alignment": "research_partner",
        "acme-commercial": "verified_commercial",
        "tartu-university": "credentialed_academic",
        "public-dev": "public",
    }
    keys = KEY_LINE.findall(out)
    assert {slug: tier for slug, tier, _ in keys} == orgs
    for slug, _tier, raw_key in keys:
        assert authenticate_key(raw_key).organization.slug == slug
    users = {name: (password, role) for name, password, role in USER_LINE.findall(out)}
    expected_staff = {
        "admin": {"rollout_admin"},
        "reviewer1": {"reviewer"},
        "reviewer2": {"reviewer"},
        "viewer": {"viewer"},
    }
    assert set(users) == set(expected_staff) | {org_admin_username(slug) for slug in SLUGS}
    for name, roles in expected_staff.items():
        assert staff_roles(authenticate(username=name, password=users[name][0])) == roles
    for slug in SLUGS:
        name = org_admin_username(slug)
        user = authenticate(username=name, password=users[name][0])
        assert staff_roles(user) == set()
        administered = Organization.objects.filter(pk__in=admin_org_ids(user))
        assert list(administered.values_list("slug", flat=True)) == [slug]
        assert users[name][1] == f"org admin of {slug}"
    assert org_admin_username("northwind-research") == "northwind-admin"


def test_passwords_and_keys_are_printed_once_and_stored_hashed(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = seed(capsys, "--no-history")
    for _name, password, _role in USER_LINE.findall(out):
        assert out.count(password) == 1
    for _slug, _tier, raw_key in KEY_LINE.findall(out):
        assert out.count(raw_key) == 1
        assert not ApiKey.objects.filter(digest__contains=raw_key).exists()
    assert seed(capsys, "--if-empty").strip() == "database is not empty; demo not seeded"


def test_traffic_keys_are_their_own_and_readable_by_the_owner_only(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = seed(capsys, "--no-history")
    path = tmp_path / "demo-traffic-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    traffic = json.loads(path.read_text())
    assert set(traffic) == set(SLUGS)
    for slug, entry in traffic.items():
        key = authenticate_key(entry["key"])
        assert (key.organization.slug, key.name, entry["tier"]) == (
            slug,
            "demo-traffic",
            key.organization.tier,
        )
        assert entry["key"] not in out  # the printed keys are the orgs' own


def test_seeded_orgs_hold_their_tiers_with_valid_evidence(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    call_command("seed_demo", "--no-history")
    now = timezone.now()
    for org in Organization.objects.all():
        tiers = effective_tiers_by_release(org, now)
        assert tiers == {"atlas-2": org.tier, "atlas-2-mini": org.tier}


def test_the_fallback_release_admits_every_tier_at_its_stage(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    call_command("seed_demo", "--no-history")
    mini = Release.objects.get(name="atlas-2-mini")
    assert (mini.current_stage, mini.state, mini.upstream_model) == (
        "general",
        "active",
        "atlas-2-mini-2026-11",
    )
    stage = plan_doc(mini.active_plan).stage(mini.current_stage)
    assert tuple(stage.tiers) == TIERS
    answers = {
        org.slug: explain_access(release=mini, organization_pk=org.pk).now.reason
        for org in Organization.objects.all()
    }
    assert answers == dict.fromkeys(SLUGS, "ok")


def test_seed_demo_refuses_a_database_in_use_unless_if_empty(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    seed(capsys, "--no-history")
    assert seed(capsys, "--if-empty").strip() == "database is not empty; demo not seeded"
    with pytest.raises(CommandError, match="not empty"):
        call_command("seed_demo")
    assert Organization.objects.count() == len(DEMO_ORGS)


def test_demo_url_sets_the_release_upstream(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    call_command("seed_demo", "--no-history", "--demo-url", "http://127.0.0.1:18001/v1")
    urls = dict(Release.objects.values_list("name", "upstream_base_url"))
    assert urls == {
        "atlas-2": "http://127.0.0.1:18001/v1",
        "atlas-2-mini": "http://127.0.0.1:18001/v1",
    }


def test_a_week_of_history_lands_in_the_rollups(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = seed(capsys)
    release = Release.objects.get(name="atlas-2")
    now = timezone.now()
    assert release.stage_entered_at < now - timedelta(days=6, hours=23)
    hours = UsageRollup.objects.filter(
        bucket_seconds=UsageRollup.HOUR, release="atlas-2", stage="research_preview"
    )
    assert hours.values("bucket_start").distinct().count() >= 24 * 7
    totals = hours.aggregate(
        **{name: Sum(name) for name in ("requests", "allowed", "denied", "errors", "flagged")}
    )
    assert all(totals[name] > 0 for name in totals), totals
    assert totals["flagged"] < totals["allowed"] * 0.01
    assert totals["errors"] < totals["allowed"] * 0.02
    # Several orgs and tiers admitted and refused; refusals of several reasons.
    assert hours.filter(allowed__gt=0).values("org").distinct().count() == 3
    reasons = set(UsageEvent.objects.filter(decision="deny").values_list("reason", flat=True))
    assert {"model_not_available", "invalid_key", "rate_limited", "release_paused"} <= reasons
    assert (
        UsageEvent.objects.count()
        == totals["requests"] + UsageEvent.objects.exclude(stage="research_preview").count()
    )
    assert f"{UsageEvent.objects.count()} usage events" in out
    # A daily rhythm: the busiest hour has several times the quietest hour's traffic.
    per_hour = list(
        hours.values("bucket_start").annotate(n=Sum("requests")).values_list("n", flat=True)
    )
    assert max(per_hour) > 4 * min(per_hour)
    # Past reviews (one a day, then one requested now) and a pause and resume.
    assert Review.objects.count() == 7
    assert Review.objects.filter(created_at__lt=now - timedelta(days=5)).exists()
    transitions = StageTransition.objects.filter(release=release).order_by("created_at")
    kinds = list(transitions.values_list("kind", flat=True))
    assert kinds == ["create", "pause", "resume"]
    assert release.state == "active"
    # The rates stay under the tripwires, so the demo is not paused by its own history;
    # the release waits for its fourteen days and two approvals.
    evaluation = evaluate(Release.objects.get(name="atlas-2"))
    assert not any(tripwire.fired for tripwire in evaluation.tripwires)
    failing = {result.name for result in evaluation.criteria if not result.passed}
    # The last day's flagged samples still await a reviewer's decision.
    assert failing == {"min_days_in_stage", "approvals", "max_confirmed_flag_rate"}
    confirmed = next(r for r in evaluation.criteria if r.name == "max_confirmed_flag_rate")
    assert "awaiting a reviewer's decision" in confirmed.explanation


def test_the_week_carries_what_screening_caught_and_its_reviewed_samples(
    db, capsys, settings, tmp_path
):
    settings.VAR_DIR = tmp_path
    out = seed(capsys)
    now = timezone.now()
    totals = evaluate(Release.objects.get(name="atlas-2")).totals
    # Flagged and routed requests were admitted; blocked ones refused with their category.
    assert set(totals.flagged_by_category) == {"bio", "cyber", "harassment", "self-harm"}
    assert set(totals.denied_by_category) == {"violence/graphic", "weapons"}
    assert sum(totals.flagged_by_category.values()) < totals.allowed * 0.005
    blocked = UsageEvent.objects.filter(reason="content_blocked")
    assert set(blocked.values_list("status", "decision")) == {(400, "deny")}
    routed = UsageEvent.objects.exclude(routed_to="")
    assert set(routed.values_list("routed_to", "flags", "status")) == {
        ("atlas-2-mini", "cyber", 200)
    }
    # One sample a screened request, kept 30 days (the first stage's retain_flagged).
    samples = FlaggedSample.objects.filter(release="atlas-2")
    screened = UsageEvent.objects.exclude(flags="")
    assert sorted(samples.values_list("request_id", "categories")) == sorted(
        screened.values_list("request_id", "flags")
    )
    assert {(s.expires_at - s.created_at).days for s in samples} == {30}
    assert {s.action for s in samples.filter(categories="weapons")} == {"block"}
    # Older than a day: decided by the reviewers, each decision audited; the rest wait.
    day_ago = now - timedelta(days=1)
    pending = samples.filter(status="pending")
    assert pending.exists() and not pending.filter(created_at__lt=day_ago).exists()
    decided = samples.exclude(status="pending")
    assert {s.decided_by.username for s in decided} == {"reviewer1", "reviewer2"}
    assert all(s.created_at < s.decided_at <= day_ago for s in decided)
    assert {"confirmed", "dismissed"} <= set(decided.values_list("status", flat=True))
    decisions = AuditEvent.objects.filter(object_type="flagged_sample")
    assert decisions.count() == decided.count()
    assert f"{samples.count()} flagged samples ({pending.count()} awaiting review)" in out
