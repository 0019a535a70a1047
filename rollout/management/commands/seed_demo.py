import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from access.keys import issue_key
from access.models import Organization, VerificationStatus
from access.organizations import create_organization
from access.verifications import create_verification
from monitoring import audit
from rollout.models import Release
from rollout.plans import apply_plan

DEMO_PLAN = settings.BASE_DIR / "docs" / "examples" / "atlas-2.yaml"
DEMO_ORGS = [
    ("northwind-research", "Northwind Research", "research_partner", "monitoring_agreement"),
    ("acme-commercial", "Acme Commercial", "verified_commercial", "business_kyc"),
    ("tartu-university", "University of Tartu", "credentialed_academic", "academic_credential"),
    ("public-dev", "Public Developer", "public", None),
]
DEMO_USERS = [("admin", "rollout_admin"), ("reviewer1", "reviewer"), ("reviewer2", "reviewer")]
ACTOR = "system:seed_demo"


class Command(BaseCommand):
    help = (
        "Create the demo: one organization per tier with valid verifications, the release "
        "atlas-2 on a four-stage plan, an admin and two reviewers, and one key per "
        "organization. Passwords and keys are printed once."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--if-empty",
            action="store_true",
            help="Succeed without change when organizations or releases exist.",
        )

    def handle(self, *args, if_empty, **options):
        if Organization.objects.exists() or Release.objects.exists():
            if if_empty:
                self.stdout.write("database is not empty; demo not seeded")
                return
            raise CommandError("database is not empty; seed_demo only fills an empty one")
        with transaction.atomic():
            passwords = self._users()
            keys = self._orgs_and_keys()
            result = apply_plan(DEMO_PLAN.read_bytes(), actor=ACTOR, comment="demo plan")
        self.stdout.write(self.style.SUCCESS(f"demo seeded: release {result.release_name}"))
        self.stdout.write("Console users (passwords shown only now):")
        for username, password in passwords:
            self.stdout.write(f"  {username:<10} {password}")
        self.stdout.write("API keys, one per organization (shown only now):")
        for slug, tier, raw_key in keys:
            self.stdout.write(f"  {slug:<20} {tier:<22} {raw_key}")

    def _users(self) -> list[tuple[str, str]]:
        created = []
        for username, role in DEMO_USERS:
            password = secrets.token_urlsafe(12)
            user = User.objects.create_user(
                username=username,
                password=password,
                is_staff=role == "rollout_admin",
                is_superuser=role == "rollout_admin",
            )
            user.groups.add(Group.objects.get(name=role))
            audit.record(
                "user.created",
                actor=ACTOR,
                object_type="user",
                object_id=username,
                data={"role": role},
            )
            created.append((username, password))
        return created

    def _orgs_and_keys(self) -> list[tuple[str, str, str]]:
        expires_at = timezone.now() + timedelta(days=365)
        keys = []
        for slug, name, tier, evidence in DEMO_ORGS:
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
        return keys
