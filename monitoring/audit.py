"""The audit log: append-only, hash-chained, written in the transaction it records.

Each row's hash covers its own content and the previous row's hash, so changing,
inserting or removing any row breaks the chain from that row on; ``verify_chain``
finds the first such row. Rows cut from the end, or a chain rewritten from some row
on with every hash recomputed, stay consistent with themselves: only a checkpoint
published earlier, outside the database, shows them (``monitoring.checkpoints``,
``verify_chain(checkpoints=...)``). Appends are serialized (a PostgreSQL advisory lock; on
SQLite the IMMEDIATE transaction mode already holds the write lock) so the chain
never forks, and ``seq`` is unique as a second guard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from monitoring.models import AuditEvent
from monitoring.redaction import SECRET_PATTERN, redact_json, redact_secrets

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the audit chain's advisory lock in PostgreSQL.
_ADVISORY_LOCK_ID = 0x5A6_A0D17


class ObjectType(StrEnum):
    """What an audit row is about: the contract between every writer of audit rows (the
    services, and the admin by model name) and the proxy's snapshot, which reads these
    rows to know what to load again (``access.snapshot``)."""

    API_KEY = "api_key"
    ORGANIZATION = "organization"
    MEMBERSHIP = "membership"
    VERIFICATION = "verification"
    RELEASE = "release"
    REVIEW = "review"
    APPROVAL = "approval"
    INCIDENT = "incident"
    USER = "user"
    GROUP = "group"
    FLAGGED_SAMPLE = "flagged_sample"
    TRAINING_FILE = "training_file"
    FINE_TUNING_JOB = "fine_tuning_job"
    TUNED_MODEL = "tuned_model"

    @classmethod
    def of_model(cls, model) -> ObjectType:
        """The type an admin change to ``model`` (a class or instance) is recorded as."""
        name = model._meta.model_name
        return LEGACY_OBJECT_TYPES.get(name) or cls(name)

    @classmethod
    def parse(cls, value: str) -> ObjectType | None:
        """The type a stored row names, old spellings included; None if unknown."""
        try:
            return LEGACY_OBJECT_TYPES.get(value) or cls(value)
        except ValueError:
            return None


# Spellings older rows hold (an earlier admin wrote the model's name): rows are never
# rewritten, so readers map them. ``of_model`` maps the admin's model names the same way.
LEGACY_OBJECT_TYPES = {
    "apikey": ObjectType.API_KEY,
    "rolloutplan": ObjectType.RELEASE,
    "stagetransition": ObjectType.RELEASE,
}


class SecretInAuditData(ValueError):
    """An audit row still held an API key's secret after redaction: a bug in
    ``monitoring.redaction``, never the caller's input. Refused rather than written."""


def actor_label(actor: Any) -> str:
    """A stable label for who did something: a username, or a ``system:`` name."""
    if actor is None:
        return "system"
    if isinstance(actor, str):
        return actor
    username = getattr(actor, "get_username", None)
    if callable(username) and getattr(actor, "is_authenticated", False):
        return username()
    return "anonymous"


def _normalize(data: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so what we hash equals what the JSON column gives back."""
    return json.loads(json.dumps(data, cls=DjangoJSONEncoder, sort_keys=True))


def compute_hash(event: AuditEvent) -> str:
    payload = {
        "seq": event.seq,
        "created_at": event.created_at.astimezone(UTC).isoformat(),
        "actor": event.actor,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "data": event.data,
        "prev_hash": event.prev_hash,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def record(
    action: str,
    *,
    actor: Any,
    object_type: ObjectType,
    object_id: str,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit row. Must be called inside the transaction of the change.

    Secrets in the row's text (an API key quoted in a reason, a name) are redacted
    before it is hashed (``monitoring.redaction``): the log never holds one, and
    never refuses a change for quoting one."""
    if not connection.in_atomic_block:
        raise RuntimeError("audit.record must run inside the transaction of the change it records")
    normalized = redact_json(_normalize(data or {}))
    actor, object_id = redact_secrets(actor_label(actor)), redact_secrets(object_id)
    # Redaction left no secret in any string, and JSON cannot join two strings into
    # one: this guard fires only if redaction itself is broken.
    if SECRET_PATTERN.search(json.dumps([actor, object_id, normalized])):
        raise SecretInAuditData(f"an API key survived redaction in an audit row ({action})")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ADVISORY_LOCK_ID])
    tail = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    seq, prev_hash = (tail[0] + 1, tail[1]) if tail else (1, GENESIS_HASH)
    event = AuditEvent(
        seq=seq,
        created_at=timezone.now(),
        actor=actor,
        action=action,
        object_type=str(object_type),  # the value, never an enum member the driver adapts itself
        object_id=object_id,
        data=normalized,
        prev_hash=prev_hash,
    )
    event.hash = compute_hash(event)
    event.save(force_insert=True)
    return event


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    reason: str


def verify_chain(
    batch_size: int = 2000, *, checkpoints: Mapping[int, str] | None = None
) -> tuple[int, ChainBreak | None]:
    """Check every row in order. Returns (rows checked, first break or None).

    ``checkpoints`` (seq -> hash, published earlier: ``monitoring.checkpoints``) must
    each still hold: the row exists and has that hash. That is what tells a chain cut
    at its end, or rewritten from some row on, from an intact one."""
    checkpoints = dict(checkpoints or {})
    if checkpoints.pop(0, GENESIS_HASH) != GENESIS_HASH:
        return 0, ChainBreak(0, "a checkpoint of the empty chain must have the genesis hash")
    expected_prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    held = 0  # the last checkpoint that held
    with transaction.atomic():
        for event in AuditEvent.objects.order_by("seq").iterator(chunk_size=batch_size):
            if event.seq != expected_seq:
                return checked, ChainBreak(expected_seq, f"row #{expected_seq} is missing")
            if event.prev_hash != expected_prev:
                return checked, ChainBreak(event.seq, "prev_hash does not match the row before")
            if compute_hash(event) != event.hash:
                return checked, ChainBreak(event.seq, "content does not match its hash")
            published = checkpoints.get(event.seq)
            if published is not None:
                if published != event.hash:
                    return checked, ChainBreak(
                        event.seq,
                        f"its hash is not the checkpoint's ({event.seq}:{published[:16]}…): "
                        f"the chain was rewritten from a row between #{held + 1} and "
                        f"#{event.seq} on, and rehashed",
                    )
                held = event.seq
            expected_prev = event.hash
            expected_seq += 1
            checked += 1
    beyond = max(checkpoints, default=0)
    if beyond >= expected_seq:
        return checked, ChainBreak(
            expected_seq,
            f"rows #{expected_seq} to #{beyond} are missing: the chain ends at "
            f"#{expected_seq - 1}, but a checkpoint has row #{beyond} (its tail was cut)",
        )
    return checked, None
