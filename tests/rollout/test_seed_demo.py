from __future__ import annotations

import re

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from access.keys import authenticate_key
from access.models import Organization
from access.tiers import effective_tiers_by_release
from rollout.models import Release
from stagegate.roles import staff_roles

KEY_LINE = re.compile(r"^\s+(\S+)\s+(\S+)\s+(sgk_\S+)$", re.MULTILINE)
USER_LINE = re.compile(r"^\s+(admin|reviewer1|reviewer2)\s+(\S+)$", re.MULTILINE)


def test_seed_demo_creates_the_demo_world(db, capsys):
    call_command("seed_demo")
    out = capsys.readouterr().out
    release = Release.objects.get(name="atlas-2")
    assert (release.current_stage, release.state, release.active_plan.version) == (
        "research_preview",
        "active",
        1,
    )
    orgs = dict(Organization.objects.values_list("slug", "tier"))
    assert orgs == {
        "northwind-research": "research_partner",
        "acme-commercial": "verified_commercial",
        "tartu-university": "credentialed_academic",
        "public-dev": "public",
    }
    keys = KEY_LINE.findall(out)
    assert {slug: tier for slug, tier, _ in keys} == orgs
    for slug, _tier, raw_key in keys:
        assert authenticate_key(raw_key).organization.slug == slug
    users = dict(USER_LINE.findall(out))
    assert staff_roles(authenticate(username="admin", password=users["admin"])) == {"rollout_admin"}
    assert staff_roles(authenticate(username="reviewer1", password=users["reviewer1"])) == {
        "reviewer"
    }
    assert staff_roles(authenticate(username="reviewer2", password=users["reviewer2"])) == {
        "reviewer"
    }


def test_seeded_orgs_hold_their_tiers_with_valid_evidence(db):
    call_command("seed_demo")
    now = timezone.now()
    for org in Organization.objects.all():
        assert effective_tiers_by_release(org, now) == {"atlas-2": org.tier}


def test_seed_demo_refuses_a_database_in_use_unless_if_empty(db, capsys):
    call_command("seed_demo")
    capsys.readouterr()
    call_command("seed_demo", "--if-empty")
    assert capsys.readouterr().out.strip() == "database is not empty; demo not seeded"
    with pytest.raises(CommandError, match="not empty"):
        call_command("seed_demo")
    assert Organization.objects.count() == 4
