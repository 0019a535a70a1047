"""API key format, issuing, checking, revocation and rotation.

A key looks like ``sgk_<key id>_<secret><checksum>``:

- ``sgk_``: an identifiable prefix (secret scanners and people recognise it);
- key id: 16 base32 characters, not secret, stored in clear and used for lookup;
- secret: 43 base62 characters (about 256 bits);
- checksum: 6 base62 characters of CRC32 over everything before it, so a mistyped
  or made-up key is refused by ``parse_key`` without touching storage.

The lengths and alphabets are ``stagegate.keyformat``'s, the one definition that
``monitoring.redaction`` and the console read too.

Only ``sha256(whole key)`` is stored. With 256 random bits a fast hash is enough:
there is nothing to brute-force, and lookups stay cheap on the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from access.models import ApiKey, Organization
from monitoring import audit
from stagegate import keyformat
from stagegate.errors import Refused

_KEY_RE = re.compile(
    rf"^{keyformat.PREFIX}(?P<key_id>[{keyformat.ID_ALPHABET}]{{{keyformat.ID_LENGTH}}})_"
    rf"(?P<secret>[0-9A-Za-z]{{{keyformat.SECRET_LENGTH}}})"
    rf"(?P<checksum>[0-9A-Za-z]{{{keyformat.CHECKSUM_LENGTH}}})$"
)


class KeyFormatError(ValueError):
    """The text is not a well-formed Stagegate key (wrong shape or checksum)."""


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(keyformat.SECRET_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), keyformat.CHECKSUM_LENGTH)


def digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (raw key, key id). The raw key exists only in the caller's hands."""
    key_id = "".join(secrets.choice(keyformat.ID_ALPHABET) for _ in range(keyformat.ID_LENGTH))
    secret = "".join(
        secrets.choice(keyformat.SECRET_ALPHABET) for _ in range(keyformat.SECRET_LENGTH)
    )
    body = f"{keyformat.PREFIX}{key_id}_{secret}"
    return body + _checksum(body), key_id


def parse_key(raw_key: str) -> str:
    """Return the key id of a well-formed key, or raise KeyFormatError."""
    match = _KEY_RE.match(raw_key)
    if match is None:
        raise KeyFormatError("not a Stagegate API key")
    body = raw_key[: -keyformat.CHECKSUM_LENGTH]
    if not hmac.compare_digest(_checksum(body), match["checksum"]):
        raise KeyFormatError("API key checksum does not match (mistyped or truncated key?)")
    return match["key_id"]


def matches(api_key: ApiKey, raw_key: str) -> bool:
    return hmac.compare_digest(api_key.digest, digest(raw_key))


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str  # shown once, never stored


def _key_audit_data(api_key: ApiKey) -> dict:
    return {
        "organization": api_key.organization.public_id,
        "name": api_key.name,
        "prefix": api_key.prefix,
        "expires_at": api_key.expires_at,
    }


def issue_key(
    *,
    organization: Organization,
    name: str,
    actor,
    expires_at: datetime | None = None,
    rotated_from: ApiKey | None = None,
) -> IssuedKey:
    raw_key, key_id = generate_key()
    with transaction.atomic():
        api_key = ApiKey.objects.create(
            key_id=key_id,
            public_id=f"key_{key_id}",
            digest=digest(raw_key),
            organization=organization,
            name=name,
            created_by=actor if getattr(actor, "pk", None) else None,
            expires_at=expires_at,
            rotated_from=rotated_from,
        )
        audit.record(
            "key.issued",
            actor=actor,
            object_type=audit.ObjectType.API_KEY,
            object_id=api_key.public_id,
            data=_key_audit_data(api_key),
        )
    return IssuedKey(api_key, raw_key)


def revoke_key(*, api_key: ApiKey, actor, reason: str = "") -> ApiKey:
    """Revoke at once. Revoking a revoked key changes nothing and writes nothing."""
    with transaction.atomic():
        api_key = (
            ApiKey.objects.select_for_update().select_related("organization").get(pk=api_key.pk)
        )
        if api_key.revoked_at is not None:
            return api_key
        api_key.revoked_at = timezone.now()
        api_key.revoked_reason = reason[:200]
        api_key.save(update_fields=["revoked_at", "revoked_reason"])
        audit.record(
            "key.revoked",
            actor=actor,
            object_type=audit.ObjectType.API_KEY,
            object_id=api_key.public_id,
            data={**_key_audit_data(api_key), "reason": api_key.revoked_reason},
        )
    return api_key


def rotate_key(*, api_key: ApiKey, actor, grace: timedelta) -> IssuedKey:
    """Issue a successor; the old key keeps working for ``grace`` and then expires.

    A grace of zero expires the old key at once. The successor inherits the old
    key's name and expiry. A key that is not active, or was rotated already, is
    Refused ``key_not_rotatable`` (409).
    """
    now = timezone.now()
    with transaction.atomic():
        old = ApiKey.objects.select_for_update().select_related("organization").get(pk=api_key.pk)
        if old.status_at(now) != "active":
            raise Refused(
                "key_not_rotatable",
                f"key {old.prefix} is {old.status_at(now)} and cannot be rotated",
            )
        if hasattr(old, "rotated_to"):
            raise Refused("key_not_rotatable", f"key {old.prefix} was already rotated")
        new = issue_key(
            organization=old.organization,
            name=old.name,
            actor=actor,
            expires_at=old.expires_at,
            rotated_from=old,
        )
        grace_end = now + grace
        if old.expires_at is None or grace_end < old.expires_at:
            old.expires_at = grace_end
        old.save(update_fields=["expires_at"])
        audit.record(
            "key.rotated",
            actor=actor,
            object_type=audit.ObjectType.API_KEY,
            object_id=old.public_id,
            data={**_key_audit_data(old), "successor": new.api_key.public_id},
        )
    return new


class KeyRefused(Refused):
    """A key that may not be used, with a stable reason code (401, as the proxy
    answers it)."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message, status=401)


def authenticate_key(raw_key: str, *, now: datetime | None = None) -> ApiKey:
    """The active key for ``raw_key`` or KeyRefused(invalid_key|key_revoked|key_expired).

    This is the database path; the proxy's hot path caches its result.
    """
    now = now or timezone.now()
    try:
        key_id = parse_key(raw_key)
    except KeyFormatError as exc:
        raise KeyRefused("invalid_key", str(exc)) from None
    api_key = ApiKey.objects.select_related("organization").filter(key_id=key_id).first()
    if api_key is None or not matches(api_key, raw_key):
        raise KeyRefused("invalid_key", "API key not recognised")
    status = api_key.status_at(now)
    if status == "revoked":
        raise KeyRefused("key_revoked", "API key has been revoked")
    if status == "expired":
        raise KeyRefused("key_expired", "API key has expired")
    return api_key


def touch_last_used(api_key: ApiKey, *, now: datetime, interval_seconds: int) -> bool:
    """Write last_used_at at most once per interval; True if it wrote."""
    if api_key.last_used_at and now - api_key.last_used_at < timedelta(seconds=interval_seconds):
        return False
    updated = touch_keys_last_used([api_key.key_id], now=now, interval_seconds=interval_seconds)
    api_key.last_used_at = now
    return bool(updated)


def touch_keys_last_used(key_ids, *, now: datetime, interval_seconds: int) -> int:
    """Set last_used_at on the keys with these ids, skipping any written within the
    interval; the number written. (The proxy batches the keys it saw.)"""
    cutoff = now - timedelta(seconds=interval_seconds)
    # Conditional UPDATE: concurrent workers cannot both write within the interval.
    return (
        ApiKey.objects.filter(key_id__in=key_ids)
        .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff))
        .update(last_used_at=now)
    )
