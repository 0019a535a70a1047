from __future__ import annotations

from django.conf import settings
from django.db import models

from monitoring.records import CodeField, KindsField
from monitoring.redaction import RedactedCharField, RedactedTextField


class AuditEvent(models.Model):
    """One append-only, hash-chained record of a change.

    Rows are written only by ``monitoring.audit.record`` inside the transaction of
    the change they describe. The database refuses UPDATE and DELETE on this table
    (a trigger, see migration 0002). There is deliberately no foreign key to users:
    deleting a user must not have to rewrite history.
    """

    seq = models.PositiveBigIntegerField(unique=True, help_text="Position in the chain, from 1.")
    created_at = models.DateTimeField()
    actor = models.CharField(max_length=150, help_text="Username, or system:<component>.")
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64, db_index=True)
    data = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["seq"]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_type}:{self.object_id} by {self.actor}"


class UsageEvent(models.Model):
    """One proxy decision and what came of it: who, which release and stage, the
    verdict and its reason, tokens and latency; and what replaying the decision against
    another plan needs (the plan version it read, the ``max_tokens`` and stream asked
    for, the tier claimed and the verifications held).

    Written in batches by ``monitoring.usage`` off the request path, never updated,
    from the proxy's ``monitoring.records.UsageRecord``. No foreign keys: the table is
    large and append-only, and it must keep its rows when a key or an organization is
    deleted. Ids are the public ones.

    Compact, since the table grows by hundreds of millions of rows a day at 10,000
    requests/s: the words every row repeats (tier, endpoint, decision, reason, error)
    are stored as small integer codes (``monitoring.records``; the ORM reads and filters
    them as words), the verifications as a bit set. Release and stage stay text: their
    names are chosen by people (a stage is whatever its plan calls it), not a fixed
    vocabulary. Rows written before the replay columns existed hold NULL in them.
    """

    created_at = models.DateTimeField(db_index=True)
    request_id = models.CharField(max_length=40)
    org = models.CharField(max_length=24, blank=True, help_text="Organization public id.")
    key = models.CharField(max_length=24, blank=True, help_text="API key public id.")
    tier = CodeField(table="tier", default="", blank=True, help_text="Effective tier.")
    release = models.CharField(max_length=63, blank=True, help_text="Model called.")
    stage = models.CharField(max_length=40, blank=True)
    endpoint = CodeField(table="endpoint")
    decision = CodeField(table="decision", help_text="allow or deny")
    reason = CodeField(table="reason", help_text="Decision reason code, or ok.")
    status = models.PositiveSmallIntegerField(help_text="HTTP status returned to the client.")
    error = CodeField(table="error", default="", blank=True, help_text="upstream_error, ...")
    streamed = models.BooleanField(default=False, help_text="The client asked for a stream.")
    client_disconnected = models.BooleanField(default=False)
    flagged = models.BooleanField(
        default=False, help_text="Flagged by screening or the upstream's content filter."
    )
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(help_text="Total time in the proxy, to the last byte.")
    upstream_latency_ms = models.FloatField(null=True, blank=True)
    plan_version = models.PositiveIntegerField(
        null=True, blank=True, help_text="Version of the release's plan the decision read."
    )
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="max_tokens asked for; blank if absent."
    )
    claimed_tier = CodeField(
        table="tier", null=True, blank=True, help_text="The organization's own tier."
    )
    verifications = KindsField(
        null=True, blank=True, help_text="Kinds of valid, unexpired verifications held."
    )
    # The database's own default too, so a writer that does not know the screening
    # columns yet (an older worker during a deploy) still writes its rows.
    flags = models.CharField(
        max_length=255,
        blank=True,
        default="",
        db_default="",
        help_text="Screening categories, sorted and comma-joined.",
    )
    routed_to = models.CharField(
        max_length=63,
        blank=True,
        default="",
        db_default="",
        help_text="The release a screening rule routed the request to.",
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["release", "stage", "created_at"]),
            # The flag rollup's scan: only events screening flagged are indexed, so the
            # rollup reads them alone and an unflagged insert costs the index nothing.
            models.Index(
                fields=["created_at"],
                condition=~models.Q(flags=""),
                name="usage_event_flagged_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.release} {self.reason} {self.status}"


class RollupBucket(models.Model):
    """What a rollup row is keyed by: one minute or one hour of one (release, stage,
    tier, org, reason, key). ``UsageRollup`` and ``UsageFlagRollup`` share it, so the
    flag rollup is read with the same bucket filters (``monitoring.rollups.covering``)."""

    MINUTE = 60
    HOUR = 3600
    BUCKETS = [(MINUTE, "minute"), (HOUR, "hour")]

    bucket_seconds = models.PositiveIntegerField(choices=BUCKETS)
    bucket_start = models.DateTimeField(help_text="UTC start of the bucket.")
    release = models.CharField(max_length=63, blank=True)
    stage = models.CharField(max_length=40, blank=True)
    tier = models.CharField(max_length=32, blank=True)
    org = models.CharField(max_length=24, blank=True, help_text="Organization public id.")
    reason = models.CharField(
        max_length=32, blank=True, default="", help_text="Decision reason code, ok if allowed."
    )
    key = models.CharField(
        max_length=24,
        blank=True,
        default="",
        help_text="API key public id, blank without a valid key.",
    )

    class Meta:
        abstract = True


class UsageRollup(RollupBucket):
    """Usage events of one (release, stage, tier, org, reason, key) summed over one
    minute or one hour.

    Stage reviews and tripwires read these rows, never the raw events, so what a review
    costs depends on its time span and the number of orgs, not on the traffic. Minute
    rows are computed from events, hour rows from minute rows, both by
    ``monitoring.rollups`` as replacing upserts: a row always holds the whole truth of
    its bucket as of the last rollup, so recomputing a bucket twice cannot double it.

    Counting rules: ``requests`` counts every event; ``allowed`` and ``denied`` split
    them by decision; ``errors`` (upstream failures) and ``flagged`` (content filter)
    count allowed events only, as do the token and latency sums, because a refused
    request reached no model.

    ``reason`` is the decision's reason code (``ok`` for every allowed event), so the
    refusals of a bucket are split by why. A reader that wants less detail sums over
    it: no reader may assume one row per (bucket, release, stage, tier, org). Rows
    written before the column existed hold ``""`` (the whole bucket, all reasons)
    until a rollup of their range replaces them.

    ``key`` is the event's API key (its public id, ``""`` for a call without a valid
    key), so the console can draw each key's usage; readers that do not show keys sum
    over it too. Rows written before the column existed hold ``""`` (every key of the
    bucket) until a rollup of their range replaces them.
    """

    requests = models.PositiveBigIntegerField(default=0)
    allowed = models.PositiveBigIntegerField(default=0)
    denied = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0, help_text="Allowed, upstream failed.")
    flagged = models.PositiveBigIntegerField(default=0, help_text="Allowed, filter fired.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0.0, help_text="Over allowed events.")

    class Meta:
        constraints = [
            # The upsert's conflict target. Leading with the bucket, its index also
            # serves the rollup's own range scans and deletes, which span all releases.
            models.UniqueConstraint(
                fields=[
                    "bucket_seconds",
                    "bucket_start",
                    "release",
                    "stage",
                    "tier",
                    "org",
                    "reason",
                    "key",
                ],
                name="usage_rollup_bucket_reason_key_key",
            ),
        ]
        # The review's read: one release and stage, hour rows over the whole hours of
        # the period and minute rows at its two edges.
        indexes = [
            models.Index(
                fields=["release", "stage", "bucket_seconds", "bucket_start"],
                name="usage_rollup_review_idx",
            )
        ]

    def __str__(self) -> str:
        return (
            f"{self.bucket_start:%Y-%m-%d %H:%M} +{self.bucket_seconds}s {self.release}"
            f" {self.stage} {self.tier} {self.org} {self.reason} {self.key}: {self.requests}"
        )


class UsageFlagRollup(RollupBucket):
    """Screening's flags per category: the usage events of one (release, stage, tier,
    org, reason, key) carrying ``category`` among their ``flags``, counted over one
    minute or one hour, keyed like ``UsageRollup`` plus the category.

    ``flagged`` counts allowed events (admitted requests flagged, or routed, in that
    category: the numerator of the category's flag rate, whose denominator is
    ``UsageRollup.allowed``); ``denied`` counts refused ones (blocked by screening,
    reason ``content_blocked``, or flagged and then refused for another reason). An
    event flagged in two categories counts once in each, so the categories of a bucket
    may add up to more than its ``UsageRollup.flagged``.

    Computed by ``monitoring.rollups`` in the same transaction as ``UsageRollup`` and
    as a replacement: a bucket's rows are recomputed whole from the truth. Only buckets
    with a flag have rows.
    """

    category = models.CharField(max_length=64, help_text="A screening category.")
    flagged = models.PositiveBigIntegerField(default=0, help_text="Allowed events.")
    denied = models.PositiveBigIntegerField(default=0, help_text="Refused events.")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "bucket_seconds",
                    "bucket_start",
                    "release",
                    "stage",
                    "tier",
                    "org",
                    "reason",
                    "key",
                    "category",
                ],
                name="usage_flag_rollup_bucket_key",
            ),
        ]
        indexes = [
            models.Index(
                fields=["release", "stage", "bucket_seconds", "bucket_start"],
                name="usage_flag_rollup_review_idx",
            )
        ]

    def __str__(self) -> str:
        return (
            f"{self.bucket_start:%Y-%m-%d %H:%M} +{self.bucket_seconds}s {self.release}"
            f" {self.stage} {self.category}: {self.flagged} flagged, {self.denied} denied"
        )


class RollupCursor(models.Model):
    """How far ``monitoring.rollups.rollup_pending`` has got.

    ``last_event_id``: every event with an id up to it has been rolled up.
    ``rolled_up_to``: the time up to which the rollups were last recomputed; events
    committed late within the rollup's lateness window are still picked up after it.
    """

    name = models.CharField(max_length=32, unique=True)
    last_event_id = models.BigIntegerField(default=0)
    rolled_up_to = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} at event {self.last_event_id}, {self.rolled_up_to}"


class FlaggedSample(models.Model):
    """A redacted excerpt of a request (or an answer) that screening flagged, blocked or
    routed, kept for human review while the stage's plan says ``retain_flagged``.

    Written by the usage writer (``monitoring.usage``) from the proxy's
    ``monitoring.records.FlagSample``; a reviewer confirms or dismisses it in the
    console (``monitoring.flags.decide_sample``, audited); the periodic
    ``monitoring.flags.delete_expired_samples`` deletes it once ``expires_at`` has
    passed, whatever its status. Ids are public ones, as on the usage event, and there
    is no foreign key to them: a sample outlives a deleted key or organization until
    it expires.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        CONFIRMED = "confirmed"
        DISMISSED = "dismissed"

    class Source(models.TextChoices):
        PROMPT = "prompt"
        RESPONSE = "response"

    class Action(models.TextChoices):
        FLAG = "flag"
        BLOCK = "block"
        ROUTE = "route"

    created_at = models.DateTimeField(help_text="When the request arrived.")
    request_id = models.CharField(max_length=40)
    release = models.CharField(max_length=63, help_text="Model called.")
    stage = models.CharField(max_length=40, blank=True)
    tier = models.CharField(max_length=32, blank=True)
    org = models.CharField(max_length=24, blank=True, help_text="Organization public id.")
    key = models.CharField(max_length=24, blank=True, help_text="API key public id.")
    categories = models.CharField(max_length=255, help_text="Sorted, comma-joined.")
    source = models.CharField(max_length=8, choices=Source.choices)
    action = models.CharField(max_length=8, choices=Action.choices)
    excerpt = RedactedTextField(help_text="Redacted and bounded (monitoring.records.excerpt).")
    status = models.CharField(
        max_length=9, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    note = RedactedCharField(max_length=500, blank=True, default="")
    expires_at = models.DateTimeField(db_index=True, help_text="Deleted after this time.")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # The review's counts (one release and stage over a period) and the queue's
            # listing by release.
            models.Index(
                fields=["release", "stage", "created_at"], name="flagged_sample_review_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.release} {self.categories} {self.status}"

    @property
    def category_list(self) -> list[str]:
        return self.categories.split(",") if self.categories else []
