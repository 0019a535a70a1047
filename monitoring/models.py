from __future__ import annotations

from django.db import models


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
    verdict and its reason, tokens and latency.

    Written in batches by ``monitoring.usage`` off the request path, never updated.
    No foreign keys: the table is large and append-only, and it must keep its rows
    when a key or an organization is deleted. Ids are the public ones.
    """

    created_at = models.DateTimeField(db_index=True)
    request_id = models.CharField(max_length=40)
    org = models.CharField(max_length=24, blank=True, help_text="Organization public id.")
    key = models.CharField(max_length=24, blank=True, help_text="API key public id.")
    tier = models.CharField(max_length=32, blank=True, help_text="Effective tier.")
    release = models.CharField(max_length=63, blank=True, help_text="Model called.")
    stage = models.CharField(max_length=40, blank=True)
    endpoint = models.CharField(max_length=32)
    decision = models.CharField(max_length=8, help_text="allow or deny")
    reason = models.CharField(max_length=32, help_text="Decision reason code, or ok.")
    status = models.PositiveSmallIntegerField(help_text="HTTP status returned to the client.")
    error = models.CharField(max_length=32, blank=True, help_text="upstream_error, ...")
    streamed = models.BooleanField(default=False)
    client_disconnected = models.BooleanField(default=False)
    flagged = models.BooleanField(default=False, help_text="Upstream content filter fired.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(help_text="Total time in the proxy, to the last byte.")
    upstream_latency_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["release", "stage", "created_at"])]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.release} {self.reason} {self.status}"
