from django.core.management.base import BaseCommand

from access.keys import revoke_key
from access.management.commands._keys import find_key


class Command(BaseCommand):
    help = "Revoke an API key at once, by its public id (key_…) or prefix (sgk_…)."

    def add_arguments(self, parser):
        parser.add_argument("key", help="key_… public id or sgk_… prefix.")
        parser.add_argument("--reason", default="", help="Kept with the key and in the audit log.")
        parser.add_argument("--actor", default="cli")

    def handle(self, *args, key, reason, actor, **options):
        api_key = revoke_key(api_key=find_key(key), actor=f"cli:{actor}", reason=reason)
        self.stdout.write(f"revoked {api_key.public_id} at {api_key.revoked_at.isoformat()}")
