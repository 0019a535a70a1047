from django.core.management.base import BaseCommand, CommandError

from monitoring.audit import verify_chain
from monitoring.checkpoints import CheckpointInvalid, read_checkpoints, verify_against


class Command(BaseCommand):
    help = (
        "Verify the audit log's hash chain; names the first broken row. With --checkpoint,"
        " also that every published checkpoint still holds (no cut tail, no rewrite)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--checkpoint",
            metavar="FILE_OR_SEQ:HASH",
            help="A checkpoint file (publish_audit_checkpoint's lines) or one seq:hash.",
        )

    def handle(self, *args, checkpoint=None, **options):
        if checkpoint is None:
            checked, broken = verify_chain()
            against = ""
        else:
            try:
                checkpoints = read_checkpoints(checkpoint)
            except CheckpointInvalid as exc:
                raise CommandError(f"checkpoint refused: {exc}") from None
            checked, broken = verify_against(checkpoints)
            latest = max(checkpoints, key=lambda c: c.seq)
            against = f", matching {len(checkpoints)} checkpoint(s) up to row #{latest.seq}"
        if broken is not None:
            raise CommandError(
                f"audit chain broken at row #{broken.seq}: {broken.reason} "
                f"({checked} rows before it are intact)"
            )
        self.stdout.write(
            self.style.SUCCESS(f"audit chain intact: {checked} rows verified{against}")
        )
