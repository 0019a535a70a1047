from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from access.keys import rotate_key
from access.management.commands._keys import find_key
from stagegate.errors import Refused


class Command(BaseCommand):
    help = "Issue a successor for a key; the old key keeps working for the grace period."

    def add_arguments(self, parser):
        parser.add_argument("key", help="key_… public id or sgk_… prefix.")
        parser.add_argument(
            "--grace-hours",
            type=float,
            default=settings.STAGEGATE_ROTATION_GRACE_HOURS,
            help="How long the old key keeps working (default %(default)s).",
        )
        parser.add_argument("--actor", default="cli")

    def handle(self, *args, key, grace_hours, actor, **options):
        if grace_hours < 0:
            raise CommandError("--grace-hours cannot be negative")
        old = find_key(key)
        try:
            issued = rotate_key(
                api_key=old, actor=f"cli:{actor}", grace=timedelta(hours=grace_hours)
            )
        except Refused as refused:
            raise CommandError(refused.message) from None
        old.refresh_from_db()
        self.stderr.write(
            f"rotated {old.public_id}: it stops working at {old.expires_at.isoformat()}; "
            f"successor {issued.api_key.public_id}, shown only now:"
        )
        self.stdout.write(issued.raw_key)
