"""Shared lookups for the key commands."""

from django.core.management.base import CommandError

from access.models import ApiKey
from stagegate import keyformat


def find_key(reference: str) -> ApiKey:
    """A key by its public id (key_…) or prefix (sgk_…), never by its secret."""
    key_id = reference.removeprefix("key_").removeprefix(keyformat.PREFIX)[: keyformat.ID_LENGTH]
    api_key = ApiKey.objects.select_related("organization").filter(key_id=key_id).first()
    if api_key is None:
        raise CommandError(f"no API key {reference[:24]!r}")
    return api_key
