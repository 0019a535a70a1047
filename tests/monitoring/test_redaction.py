"""Key-shaped text in free text: the change goes ahead, and no secret is kept (issue 13,
defect 2). Found by fuzzing: a key name, a revoke or pause reason, an org name or an
incident title holding ``sgk_…`` made the write fail with 500, and revoking a leaked
key with the key quoted in the reason left it active."""

from __future__ import annotations

import io
import json
import logging

import pytest
from django.apps import apps
from django.core import serializers
from django.core.management import call_command
from hypothesis import given
from hypothesis import strategies as st

from access import keys
from access.models import ApiKey, Organization
from monitoring import audit
from monitoring.models import AuditEvent
from monitoring.redaction import (
    REDACTED,
    SECRET_PATTERN,
    RedactSecretsFilter,
    redact_json,
    redact_secrets,
)
from rollout.models import Incident, RolloutPlan, StageTransition
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN

# Shaped like a key (and matched by redaction) without being one: no checksum.
KEY_SHAPED = "sgk_abcdef0123456789_" + "Zx9" * 15


def _secret(raw_key: str) -> str:
    return raw_key.rsplit("_", 1)[1]


def _redacted(raw_key: str) -> str:
    return raw_key.rsplit("_", 1)[0] + "_" + REDACTED


def _dump_database() -> str:
    return "".join(
        serializers.serialize("json", model.objects.all()) for model in apps.get_models()
    )


def _audit_data(action: str) -> list[dict]:
    return list(AuditEvent.objects.filter(action=action).values_list("data", flat=True))


# --- the function ------------------------------------------------------------------------------


def test_redact_secrets_keeps_prefix_and_id_of_a_real_key():
    raw_key, key_id = keys.generate_key()

    assert redact_secrets(f"leaked: {raw_key}.") == f"leaked: sgk_{key_id}_[redacted]."


def test_redact_secrets_is_idempotent_and_never_lengthens():
    raw_key, _ = keys.generate_key()
    texts = [
        f"{raw_key} and {raw_key}",
        raw_key + raw_key,  # pasted twice without a space: both secrets go
        raw_key.upper(),  # case is cheap to guess against the checksum
        KEY_SHAPED,
        "sgk_abcdef0123456789_" + "a" * 10,  # exactly as long as [redacted]
    ]
    for text in texts:
        once = redact_secrets(text)
        assert (redact_secrets(once), len(once) <= len(text)) == (once, True)
        assert REDACTED in once
        assert _secret(raw_key) not in once
        assert _secret(raw_key).upper() not in once


def test_redact_secrets_leaves_other_text_alone():
    texts = [
        "sgk_abcdef0123456789",  # a prefix, as commands and lists show a key
        "key_abcdef0123456789",  # a public id
        "sgk_abcdef0123456789_short",  # under ten characters: no secret to speak of
        "sgk_abcdef012345678_" + "a" * 40,  # a 15-character id: not a key
        "plain text, snake_case_words and an_underscore",
    ]
    assert [redact_secrets(text) for text in texts] == texts


_RAW_KEY, _KEY_ID = keys.generate_key()
_PIECES = [
    _RAW_KEY,
    _RAW_KEY.upper(),
    "sgk_",
    _KEY_ID,
    "_",
    _secret(_RAW_KEY)[:12],
    "\x00",
    "\n",
    "é",
    "\\",
    '"',
    " ",
    REDACTED,
]


@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))
def test_no_text_leaves_a_secret_for_the_audit_guard_to_find(text):
    """What ``audit.record`` checks after redacting: the JSON of the row's strings."""
    redacted = redact_json({text: [text, {"note": text}]})

    written = json.dumps(redacted)
    assert SECRET_PATTERN.search(written) is None
    assert _secret(_RAW_KEY).upper() not in written.upper()
    assert redact_secrets(redact_secrets(text)) == redact_secrets(text)


# --- the audit log -------------------------------------------------------------------------


def test_audit_record_redacts_instead_of_refusing(db):
    from django.db import transaction

    raw_key, key_id = keys.generate_key()
    with transaction.atomic():
        event = audit.record(
            "x",
            actor=f"cli:{raw_key}",
            object_type="t",
            object_id="1",
            data={"note": f"key {raw_key}", raw_key: [raw_key]},
        )

    stored = AuditEvent.objects.get()
    redacted = f"sgk_{key_id}_[redacted]"
    assert (stored.actor, stored.data) == (
        f"cli:{redacted}",
        {"note": f"key {redacted}", redacted: [redacted]},
    )
    assert (stored.hash, audit.compute_hash(stored)) == (event.hash, event.hash)
    assert audit.verify_chain() == (1, None)


# --- the interfaces ----------------------------------------------------------------------


def test_revoke_key_command_with_the_leaked_key_in_the_reason_revokes_it(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    raw_key = issued.raw_key
    out = io.StringIO()

    call_command(
        "revoke_key", issued.api_key.prefix, reason=f"leaked: {raw_key} in a log", stdout=out
    )

    assert out.getvalue().startswith(f"revoked {issued.api_key.public_id} at ")
    with pytest.raises(keys.KeyRefused) as refused:
        keys.authenticate_key(raw_key)
    assert refused.value.code == "key_revoked"
    reason = f"leaked: {_redacted(raw_key)} in a log"
    assert ApiKey.objects.get().revoked_reason == reason
    assert [data["reason"] for data in _audit_data("key.revoked")] == [reason]
    assert _secret(raw_key) not in _dump_database()
    assert audit.verify_chain() == (2, None)


def test_key_named_after_a_live_key_is_issued_with_the_name_redacted(login_as, ada, northwind):
    live = keys.issue_key(organization=northwind, name="ci", actor=ada).raw_key

    response = login_as(ada).post(
        "/api/keys/",
        {"organization": northwind.public_id, "name": f"copy of {live}"},
        format="json",
    )

    assert response.status_code == 201
    name = f"copy of {_redacted(live)}"
    assert response.json()["name"] == name
    assert ApiKey.objects.get(public_id=response.json()["public_id"]).name == name
    assert [data["name"] for data in _audit_data("key.issued")] == ["ci", name]
    assert _secret(live) not in _dump_database()


def test_org_named_with_key_shaped_text_is_created_redacted(login_as, ada):
    response = login_as(ada).post(
        "/api/orgs/",
        {"slug": "globex", "name": f"Globex {KEY_SHAPED}", "tier": "public"},
        format="json",
    )

    assert response.status_code == 201
    name = f"Globex {redact_secrets(KEY_SHAPED)}"
    assert (response.json()["name"], Organization.objects.get(slug="globex").name) == (name, name)
    assert [data["name"] for data in _audit_data("org.created")] == [name]


def test_org_renamed_with_key_shaped_text_is_renamed_redacted(login_as, ada, tartu):
    client = login_as(ada)
    url = f"/api/orgs/{tartu.public_id}/"

    response = client.patch(url, {"name": KEY_SHAPED}, format="json")
    again = client.patch(url, {"name": KEY_SHAPED}, format="json")  # no change: no row

    assert (response.status_code, again.status_code) == (200, 200)
    tartu.refresh_from_db()
    assert tartu.name == redact_secrets(KEY_SHAPED)
    assert [data["changes"]["name"]["to"] for data in _audit_data("org.updated")] == [tartu.name]


def test_pause_with_a_key_in_the_reason_pauses_redacted(login_as, ada, release, northwind):
    live = keys.issue_key(organization=northwind, name="ci", actor=ada).raw_key

    response = login_as(ada).post(
        f"/api/releases/{release.public_id}/pause/",
        {"reason": f"abuse from {live}"},
        format="json",
    )

    assert response.status_code == 201
    release.refresh_from_db()
    reason = f"abuse from {_redacted(live)}"
    assert (release.state, StageTransition.objects.get(kind="pause").reason) == ("paused", reason)
    assert response.json()["reason"] == reason
    assert [data["reason"] for data in _audit_data("release.pause")] == [reason]
    assert _secret(live) not in _dump_database()


def test_incident_titled_with_a_key_is_filed_redacted(login_as, ada, release, northwind):
    live = keys.issue_key(organization=northwind, name="ci", actor=ada).raw_key

    response = login_as(ada).post(
        "/api/incidents/",
        {
            "release": release.name,
            "severity": "low",
            "title": f"key {live} posted publicly",
            "description": f"found {live} and {KEY_SHAPED}",
        },
        format="json",
    )

    assert response.status_code == 201
    incident = Incident.objects.get()
    title = f"key {_redacted(live)} posted publicly"
    assert (response.json()["title"], incident.title) == (title, title)
    assert incident.description == f"found {_redacted(live)} and {redact_secrets(KEY_SHAPED)}"
    assert [data["title"] for data in _audit_data("incident.opened")] == [title]
    assert _secret(live) not in _dump_database()


def test_plan_quoting_a_key_is_applied_with_the_key_redacted(db, ada, northwind):
    live = keys.issue_key(organization=northwind, name="ci", actor=ada).raw_key
    text = EXAMPLE_PLAN.read_text() + f"\n# upstream reached with {live}\n"

    result = apply_plan(text, actor=ada, comment=f"rotated {live}")

    assert result.applied
    plan = RolloutPlan.objects.get()
    assert plan.source.endswith(f"# upstream reached with {_redacted(live)}\n")
    assert plan.comment == f"rotated {_redacted(live)}"
    assert _secret(live) not in _dump_database()


def test_no_secret_reaches_the_audit_log_through_any_of_these(login_as, ada, release, northwind):
    client = login_as(ada)
    live = keys.issue_key(organization=northwind, name="ci", actor=ada).raw_key
    calls = [
        ("/api/keys/", {"organization": northwind.public_id, "name": live}),
        ("/api/orgs/", {"slug": "globex", "name": live, "tier": "public"}),
        (f"/api/orgs/{northwind.public_id}/", {"name": live}),
        (f"/api/releases/{release.public_id}/pause/", {"reason": live}),
        (f"/api/releases/{release.public_id}/resume/", {"reason": live}),
        ("/api/incidents/", {"release": release.name, "severity": "low", "title": live}),
        (f"/api/keys/{ApiKey.objects.get().public_id}/revoke/", {"reason": live}),
    ]

    statuses = [
        (client.patch if url.startswith("/api/orgs/org_") else client.post)(
            url, data, format="json"
        ).status_code
        for url, data in calls
    ]

    assert statuses == [201, 201, 200, 201, 201, 201, 200]
    audit_rows = serializers.serialize("json", AuditEvent.objects.all())
    assert _secret(live) not in audit_rows
    assert audit_rows.count(_redacted(live)) >= len(calls)
    assert audit.verify_chain()[1] is None


# --- the logs ------------------------------------------------------------------------------


def test_log_lines_and_tracebacks_hold_no_secret():
    """Through the handler LOGGING configures: a message quoting a key, and an
    exception whose message quotes one."""
    handler = next(
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, RedactSecretsFilter) for f in h.filters)
    )
    raw_key, _ = keys.generate_key()
    stream = io.StringIO()
    previous = handler.setStream(stream)
    log = logging.getLogger("stagegate.test")
    try:
        log.warning("client sent %s", raw_key)
        try:
            raise ValueError(f"bad value {raw_key!r}")
        except ValueError:
            log.exception("failed")
    finally:
        handler.setStream(previous)

    written = stream.getvalue()
    assert _secret(raw_key) not in written
    assert written.count(_redacted(raw_key)) == 2
