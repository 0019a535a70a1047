"""Shared lookups for the key commands."""

from django.core.management.base import CommandError

from access.keys import KEY_PREFIX
from access.models import ApiKey


def find_key(reference: str) -> ApiKey:
    """A key by its public id (key_…) or prefix (sgk_…), never by its secret."""
    key_id = reference.removeprefix("key_").removeprefix(KEY_PREFIX)[:16]
    api_key = ApiKey.objects.select_related("organization").filter(key_id=key_id).first()
    if api_key is None:
        raise CommandError(f"no API key {reference[:24]!r}")
    return api_key
