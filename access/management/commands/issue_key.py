from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from access.keys import issue_key
from access.models import Organization


class Command(BaseCommand):
    help = "Issue an API key for an organization. The key is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("org", help="Organization slug.")
        parser.add_argument("--name", default="default", help="A label for the key.")
        parser.add_argument("--expires-in-days", type=int, help="Expire after N days.")
        parser.add_argument("--actor", default="cli", help="Name recorded in the audit log.")

    def handle(self, *args, org, name, expires_in_days, actor, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"no organization {org!r}")
        if not 1 <= len(name.strip()) <= 100:
            raise CommandError("--name must be 1 to 100 characters")
        if expires_in_days is not None and expires_in_days <= 0:
            raise CommandError("--expires-in-days must be positive")
        expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        issued = issue_key(
            organization=organization,
            name=name.strip(),
            actor=f"cli:{actor}",
            expires_at=expires_at,
        )
        self.stderr.write(
            f"issued {issued.api_key.public_id} for {organization.slug} ({organization.tier}); "
            "this is the only time the key is shown:"
        )
        self.stdout.write(issued.raw_key)
