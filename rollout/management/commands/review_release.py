from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from rollout.models import Release, ReviewTrigger
from rollout.reviews import create_review
from stagegate.errors import Refused


class Command(BaseCommand):
    help = "Review a release's current stage now: store the review and print each criterion."

    def add_arguments(self, parser):
        parser.add_argument("release", help="Release name, e.g. atlas-2.")
        parser.add_argument(
            "--as",
            dest="username",
            help="Who requests it (that user then cannot approve it); default: the schedule.",
        )

    def handle(self, *args, release, username, **options):
        found = Release.objects.filter(name=release).first()
        if found is None:
            raise CommandError(f"no release named {release!r}")
        user = None
        if username:
            user = get_user_model().objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"no user named {username!r}")
        trigger = ReviewTrigger.API if user else ReviewTrigger.SCHEDULE
        try:
            review = create_review(found, trigger=trigger, requested_by=user)
        except Refused as refused:
            raise CommandError(refused.message) from None
        self.stdout.write(
            f"{review.public_id}: {found.name} in {review.stage}: {review.recommendation}"
            f" ({review.summary})"
        )
        for result in [*review.criteria, *review.tripwires]:
            mark = "ok  " if result.get("passed", not result.get("fired")) else "FAIL"
            self.stdout.write(f"  {mark} {result['name']}: {result['explanation']}")
