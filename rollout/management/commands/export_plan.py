from django.core.management.base import BaseCommand, CommandError

from rollout.models import Release, RolloutPlan
from rollout.plans import export_plan


class Command(BaseCommand):
    help = "Print a release's active (or given) plan version as canonical YAML."

    def add_arguments(self, parser):
        parser.add_argument("release", help="Release name, e.g. atlas-2.")
        parser.add_argument(
            "--plan-version", type=int, help="A past version (default: the active one)."
        )

    def handle(self, *args, release, plan_version, **options):
        found = Release.objects.filter(name=release).first()
        if found is None:
            raise CommandError(f"no release named {release!r}")
        try:
            self.stdout.write(export_plan(found, plan_version), ending="")
        except RolloutPlan.DoesNotExist:
            raise CommandError(f"{release} has no plan version {plan_version}") from None
