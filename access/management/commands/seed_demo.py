"""``manage.py seed_demo``: an empty database filled with the demo world (staff users,
organizations with their members, verifications and keys, atlas-2 on the example plan
beside atlas-2-mini, the fallback its screening routes to, and a week of atlas-2's usage
history with its reviews and stages, and its fine-tuning jobs: ``tuning.demo_history``).

It lives in ``access``, the app that may import the others (access -> rollout ->
monitoring, docs/architecture.md), because it creates organizations and keys as much
as releases; in ``rollout`` it was the one place rollout imported access.
"""

import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from access.keys import issue_key
from access.models import MembershipRole, Organization, VerificationStatus
from access.organizations import add_member, create_organization
from access.verifications import create_verification
from monitoring import audit
from rollout.demo_history import HISTORY_DAYS, Caller, review_samples, seed_history
from rollout.models import Release, ReviewTrigger, StageTransition
from rollout.plans import apply_plan, plan_doc
from rollout.reviews import create_review
from rollout.transitions import pause, resume
from tuning.demo_history import seed_fine_tuning

DEMO_PLAN = settings.BASE_DIR / "docs" / "examples" / "atlas-2.yaml"
# Applied first: atlas-2's screening routes to it.
FALLBACK_PLAN = settings.BASE_DIR / "docs" / "examples" / "atlas-2-mini.yaml"
# The plans' upstream, and atlas-2's classifier under it: the demo model's default port.
DEMO_URL = "http://127.0.0.1:8001/v1"
# slug, name, tier, evidence, share of the demo traffic
DEMO_ORGS = [
    ("northwind-research", "Northwind Research", "research_partner", "monitoring_agreement", 30),
    ("meridian-safety-lab", "Meridian Safety Lab", "research_partner", "monitoring_agreement", 22),
    ("oxbridge-alignment", "Oxbridge Alignment", "research_partner", "monitoring_agreement", 14),
    ("acme-commercial", "Acme Commercial", "verified_commercial", "business_kyc", 7),
    ("tartu-university", "University of Tartu", "credentialed_academic", "academic_credential", 3),
    ("public-dev", "Public Developer", "public", None, 3),
]
UNKNOWN_KEY_SHARE = 2  # calls with a key nobody issued
DEMO_USERS = [
    ("admin", "rollout_admin"),
    ("reviewer1", "reviewer"),
    ("reviewer2", "reviewer"),
    ("viewer", "viewer"),
]
TRAFFIC_KEY_NAME = "demo-traffic"
TRAFFIC_KEYS_FILE = "demo-traffic-keys.json"
ACTOR = "system:seed_demo"


def org_admin_username(slug: str) -> str:
    """The demo org admin of ``slug``: its first word and ``-admin``
    (``northwind-research`` -> ``northwind-admin``)."""
    return f"{slug.split('-')[0]}-admin"


def traffic_keys_path() -> Path:
    return Path(settings.VAR_DIR) / TRAFFIC_KEYS_FILE


def _hashed_passwords(usernames: list[str]) -> dict[str, tuple[str, str]]:
    """username -> (new password, its hash), hashed in parallel: PBKDF2 takes half a
    second a password by design and releases the GIL, so ten take one second, not five."""
    passwords = {username: secrets.token_urlsafe(12) for username in usernames}
    with ThreadPoolExecutor(max_workers=len(passwords)) as pool:
        hashes = dict(zip(passwords, pool.map(make_password, passwords.values()), strict=True))
    return {username: (passwords[username], hashes[username]) for username in passwords}


class Command(BaseCommand):
    help = (
        "Create the demo: six organizations (three research partners, one of each other "
        "tier) with valid verifications, the release atlas-2 on a four-stage plan with a "
        "week of usage history (rolled up, with daily reviews and a past pause) and of "
        "fine-tuning (a tuned model callable, a dataset and a tuned model held for review, a "
        "dataset rejected), an admin, "
        "two reviewers, a viewer and one org admin per organization, and one key per "
        "organization; atlas-2-mini, open to every tier, is the fallback atlas-2's "
        "screening routes to. Passwords and keys are printed once. The demo traffic generator's "
        "keys are written to $STAGEGATE_VAR_DIR/demo-traffic-keys.json (mode 0600)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--if-empty",
            action="store_true",
            help="Succeed without change when organizations or releases exist.",
        )
        parser.add_argument(
            "--demo-url",
            default=DEMO_URL,
            help=(
                "the demo model server's base URL for the releases' upstream and atlas-2's"
                f" classifier (default {DEMO_URL})"
            ),
        )
        parser.add_argument(
            "--no-history", action="store_true", help="skip the week of usage history"
        )

    def handle(self, *args, if_empty, demo_url, no_history, **options):
        if Organization.objects.exists() or Release.objects.exists():
            if if_empty:
                self.stdout.write("database is not empty; demo not seeded")
                return
            raise CommandError("database is not empty; seed_demo only fills an empty one")
        now = timezone.now()
        self._hashes = _hashed_passwords(
            [name for name, _ in DEMO_USERS] + [org_admin_username(slug) for slug, *_ in DEMO_ORGS]
        )
        with transaction.atomic():
            passwords = self._users()
            orgs, keys, traffic_keys = self._orgs_and_keys()
            passwords += self._org_admins(orgs)
            for path in (FALLBACK_PLAN, DEMO_PLAN):
                plan = path.read_text().replace(DEMO_URL, demo_url.rstrip("/"))
                result = apply_plan(plan, actor=ACTOR, comment="demo plan")
            release = Release.objects.get(name=result.release_name)
            history = "" if no_history else self._history(release, orgs, now)
        self._write_traffic_keys(traffic_keys)
        self.stdout.write(
            self.style.SUCCESS(f"demo seeded: release {result.release_name}{history}")
        )
        self.stdout.write("Console users (passwords shown only now):")
        for username, password, role in passwords:
            self.stdout.write(f"  {username:<16} {password:<18} {role}")
        self.stdout.write("API keys, one per organization (shown only now):")
        for slug, tier, raw_key in keys:
            self.stdout.write(f"  {slug:<20} {tier:<22} {raw_key}")

    def _users(self) -> list[tuple[str, str, str]]:
        created = []
        for username, role in DEMO_USERS:
            password = self._user(username, role)
            # get_or_create: the role groups come from a migration, but a flushed database
            # (a test run's, or one emptied by hand) has none.
            group, _ = Group.objects.get_or_create(name=role)
            group.user_set.add(User.objects.get(username=username))
            created.append((username, password, role.replace("_", " ")))
        return created

    def _user(self, username: str, role: str) -> str:
        password, hashed = self._hashes[username]
        User.objects.create(
            username=username,
            password=hashed,
            is_staff=role == "rollout_admin",
            is_superuser=role == "rollout_admin",
        )
        audit.record(
            "user.created",
            actor=ACTOR,
            object_type=audit.ObjectType.USER,
            object_id=username,
            data={"role": role},
        )
        return password

    def _org_admins(self, orgs: list[Organization]) -> list[tuple[str, str, str]]:
        admin = User.objects.get(username="admin")  # adds members as a rollout admin would
        created = []
        for org in orgs:
            username = org_admin_username(org.slug)
            password = self._user(username, MembershipRole.ORG_ADMIN)
            add_member(
                organization=org, username=username, role=MembershipRole.ORG_ADMIN, actor=admin
            )
            created.append((username, password, f"org admin of {org.slug}"))
        return created

    def _orgs_and_keys(self):
        expires_at = timezone.now() + timedelta(days=365)
        orgs, keys, traffic_keys = [], [], {}
        for slug, name, tier, evidence, _share in DEMO_ORGS:
            org = create_organization(slug=slug, name=name, tier=tier, actor=ACTOR)
            if evidence:
                create_verification(
                    organization=org,
                    kind=evidence,
                    status=VerificationStatus.VALID,
                    expires_at=expires_at,
                    evidence_note="demo evidence",
                    actor=ACTOR,
                )
            issued = issue_key(organization=org, name="demo", actor=ACTOR)
            keys.append((slug, tier, issued.raw_key))
            traffic = issue_key(organization=org, name=TRAFFIC_KEY_NAME, actor=ACTOR)
            traffic_keys[slug] = {"tier": tier, "key": traffic.raw_key}
            orgs.append(org)
        return orgs, keys, traffic_keys

    def _history(self, release: Release, orgs: list[Organization], now) -> str:
        """A week in the first stage: the stint backdated to its start, the usage written
        and rolled up with the samples its screening kept (those older than a day
        reviewed), a pause and resume three days ago, a review each morning."""
        start = now - timedelta(days=HISTORY_DAYS)
        stage = plan_doc(release.active_plan).stage(release.current_stage)
        # Demo only: the release is made to have entered its stage a week ago (the audit
        # rows keep their true time).
        Release.objects.filter(pk=release.pk).update(stage_entered_at=start)
        release.transitions.update(created_at=start)
        release.refresh_from_db()
        by_slug = {org.slug: org for org in orgs}
        callers = [
            Caller(
                org=by_slug[slug].public_id,
                key=by_slug[slug].keys.get(name="demo").public_id,
                tier=tier,
                admitted=tier in stage.tiers
                and (stage.allow_orgs is None or slug in stage.allow_orgs),
                weight=share,
                verifications=(evidence,) if evidence else (),
            )
            for slug, _name, tier, evidence, share in DEMO_ORGS
        ]
        callers.append(Caller("", "", "", False, UNKNOWN_KEY_SHARE))
        pause_at = (now - timedelta(days=3)).replace(hour=14, minute=20, second=0, microsecond=0)
        paused = (pause_at, pause_at + timedelta(minutes=45))
        retain = stage.screening.retain_flagged if stage.screening is not None else None
        count, report = seed_history(
            release=release.name,
            stage=release.current_stage,
            callers=callers,
            end=now,
            paused=paused,
            plan_version=release.active_plan.version,
            retain_days=retain.days if retain is not None else None,
        )
        reviewers = list(User.objects.filter(username__in=("reviewer1", "reviewer2")))
        decided, pending = review_samples(
            release=release.name, reviewers=reviewers, before=now - timedelta(days=1)
        )
        # Before the daily reviews, which count the fine-tuning of their day.
        tuning = seed_fine_tuning(
            release=release,
            api_keys={org.slug: org.keys.get(name="demo") for org in orgs},
            end=now,
            actor=ACTOR,
        )
        admin = User.objects.get(username="admin")
        for when, act, reason in (
            (paused[0], pause, "upstream errors at 7% after the model server's redeploy"),
            (paused[1], resume, "model server rolled back; errors back under 1%"),
        ):
            act(release, actor=admin, reason=reason)
            StageTransition.objects.filter(pk=release.transitions.first().pk).update(
                created_at=when
            )
        for day in range(1, HISTORY_DAYS):
            create_review(
                release,
                trigger=ReviewTrigger.SCHEDULE,
                now=start + timedelta(days=day, hours=1),
                roll_up=False,
            )
        reviewer = User.objects.get(username="reviewer1")
        create_review(release, trigger=ReviewTrigger.API, requested_by=reviewer, roll_up=False)
        return (
            f", {count} usage events over {HISTORY_DAYS} days in {report.buckets_written} rollups,"
            f" {decided + pending} flagged samples ({pending} awaiting review),"
            f" {tuning.summary()}"
        )

    def _write_traffic_keys(self, traffic_keys: dict) -> None:
        """Demo only: the traffic generator's keys in clear, readable by this user alone."""
        path = traffic_keys_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(traffic_keys, file, indent=2)
