import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from rollout.plan_schema import PlanInvalid
from rollout.plans import apply_plan


class Command(BaseCommand):
    help = (
        "Validate a rollout plan (YAML or JSON), show its diff against the active version "
        "and store it as a new immutable version. Nothing is stored if any error is found."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="Plan document; '-' reads standard input.")
        parser.add_argument("--dry-run", action="store_true", help="Validate and diff only.")
        parser.add_argument("--comment", default="", help="Why this version (kept with it).")
        parser.add_argument("--actor", default="cli", help="Name recorded in the audit log.")

    def handle(self, *args, file, dry_run, comment, actor, **options):
        if file == "-":
            source = sys.stdin.read()
        else:
            try:
                source = Path(file).read_bytes()
            except OSError as exc:
                raise CommandError(f"cannot read {file}: {exc.strerror}") from None
        try:
            result = apply_plan(source, actor=f"cli:{actor}", dry_run=dry_run, comment=comment)
        except PlanInvalid as exc:
            for error in exc.errors:
                self.stderr.write(f"  {error.path}: {error.message} [{error.code}]")
            raise CommandError(
                f"plan refused: {len(exc.errors)} error(s); nothing was applied"
            ) from None
        if not result.changed:
            self.stdout.write(
                f"{result.release_name}: identical to v{result.version}; nothing to do"
            )
            return
        self.stdout.write(result.diff.rstrip() or "(no previous version)")
        if dry_run:
            self.stdout.write(
                f"dry run: {result.release_name} would get v{result.version}; nothing was applied"
            )
        else:
            created = " (release created)" if result.created_release else ""
            self.stdout.write(
                self.style.SUCCESS(f"applied {result.release_name} v{result.version}{created}")
            )
