"""Random, non-guessable public identifiers for objects that appear in URLs."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase


def new_public_id(prefix: str) -> str:
    """``prefix_`` followed by 16 random base32 characters (80 bits)."""
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(16))


# Field defaults must be importable module-level functions for migrations.
def new_org_id() -> str:
    return new_public_id("org")


def new_verification_id() -> str:
    return new_public_id("ver")


def new_membership_id() -> str:
    return new_public_id("mem")


def new_key_public_id() -> str:
    return new_public_id("key")


def new_release_id() -> str:
    return new_public_id("rel")


def new_plan_id() -> str:
    return new_public_id("plan")


def new_transition_id() -> str:
    return new_public_id("tr")


def new_review_id() -> str:
    return new_public_id("rev")


def new_approval_id() -> str:
    return new_public_id("apv")


def new_incident_id() -> str:
    return new_public_id("inc")


def _openai_style(prefix: str) -> str:
    # OpenAI's shapes (``file-...``, ``ftjob-...``): clients and tools match on them.
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def new_file_id() -> str:
    return _openai_style("file")


def new_job_id() -> str:
    return _openai_style("ftjob")


def new_job_event_id() -> str:
    return _openai_style("ftevent")


def new_tuned_model_id() -> str:
    return new_public_id("ftm")


def new_tuning_decision_id() -> str:
    return new_public_id("ftd")
