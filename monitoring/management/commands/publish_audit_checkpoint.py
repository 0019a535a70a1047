from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from monitoring.checkpoints import publish_checkpoint
from stagegate.webhooks import WebhookFailed


class Command(BaseCommand):
    help = (
        "Publish the audit chain's latest seq and hash now: a line in"
        " STAGEGATE_AUDIT_CHECKPOINT_FILE, the webhook if configured, a log line."
    )

    def handle(self, *args, **options):
        try:
            published = publish_checkpoint()
        except WebhookFailed as exc:
            raise CommandError(f"checkpoint written and logged, but not posted: {exc}") from None
        where = settings.STAGEGATE_AUDIT_CHECKPOINT_FILE
        written = f"appended to {where}" if published.appended else f"already last in {where}"
        posted = "; posted to the webhook" if published.posted else ""
        self.stdout.write(f"audit checkpoint {published.checkpoint} ({written}{posted})")
