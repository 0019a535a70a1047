"""monitoring/migrations: the data migrations, run with ``manage.py migrate`` on rows
written before them."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection

from monitoring.models import UsageEvent

BEFORE_CODES = "0006_usage_rollup_key"
TABLE = UsageEvent._meta.db_table
# Rows as the proxy wrote them before words were codes: (request_id, tier, endpoint,
# decision, reason, error).
WORDS = [
    ("req_1", "research_partner", "chat.completions", "allow", "ok", ""),
    ("req_2", "public", "embeddings", "allow", "ok", "upstream_timeout"),
    ("req_3", "", "models", "deny", "invalid_key", ""),
    ("req_4", "verified_commercial", "authz", "deny", "rate_limited", ""),
    ("req_5", "", "chat.completions", "deny", "request_timeout", ""),
]


@pytest.fixture
def before_codes(live_db):
    """The monitoring app migrated back to before usage events held codes; forward again
    after the test, whatever it did, so the rest of the session has the current schema."""
    call_command("migrate", "monitoring", BEFORE_CODES, verbosity=0)
    yield
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {TABLE}")
    call_command("migrate", "monitoring", verbosity=0)


def _insert_words() -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {TABLE} (created_at, request_id, org, key, tier, release, stage,"
            " endpoint, decision, reason, status, error, streamed, client_disconnected,"
            " flagged, prompt_tokens, completion_tokens, latency_ms)"
            " VALUES ('2026-11-02 09:00:00+00', %s, 'org_a', 'key_a', %s, 'atlas-2',"
            " 'research_preview', %s, %s, %s, 200, %s, false, false, false, 1, 2, 3.5)",
            WORDS,
        )


def test_migration_turns_words_into_codes_and_back(before_codes):
    _insert_words()

    call_command("migrate", "monitoring", verbosity=0)

    read = UsageEvent.objects.order_by("request_id").values_list(
        "request_id", "tier", "endpoint", "decision", "reason", "error"
    )
    assert list(read) == WORDS
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT tier, endpoint, decision, reason, error FROM {TABLE}"
            " WHERE request_id = 'req_4'"
        )
        assert cursor.fetchone() == (2, 6, 2, 9, 0)
    # Not recorded before: the replay columns are empty, not guessed.
    replay = UsageEvent.objects.values_list(
        "plan_version", "max_tokens", "claimed_tier", "verifications"
    ).distinct()
    assert list(replay) == [(None, None, None, None)]

    call_command("migrate", "monitoring", BEFORE_CODES, verbosity=0)

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT request_id, tier, endpoint, decision, reason, error FROM {TABLE}"
            " ORDER BY request_id"
        )
        assert cursor.fetchall() == WORDS


@pytest.mark.django_db
def test_a_writer_that_does_not_know_the_screening_columns_still_inserts():
    # An older proxy worker during a deploy writes the columns it knows: the database's
    # own default (migration 0008) fills flags and routed_to.
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (created_at, request_id, org, key, tier, release, stage,"
            " endpoint, decision, reason, status, error, streamed, client_disconnected,"
            " flagged, prompt_tokens, completion_tokens, latency_ms)"
            " VALUES ('2026-11-02 09:00:00+00', 'req_old', 'org_a', 'key_a', 1, 'atlas-2',"
            " 'research_preview', 1, 1, 1, 200, 0, false, false, false, 1, 2, 3.5)"
        )
    event = UsageEvent.objects.get(request_id="req_old")
    assert (event.flags, event.routed_to, event.flagged) == ("", "", False)
