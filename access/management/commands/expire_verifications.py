from django.core.management.base import BaseCommand

from access.tier_changes import expire_verifications


class Command(BaseCommand):
    help = "Mark verifications past their expiry as expired and audit the tier changes."

    def handle(self, *args, **options):
        count = expire_verifications()
        self.stdout.write(f"{count} verification(s) expired")
