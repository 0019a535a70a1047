"""Audit checkpoints outside the database, and ``verify_audit --checkpoint`` (issue 13,
defect 10): the chain alone said "intact" after its last rows were deleted, or after
every hash was recomputed from some row on; a checkpoint published earlier does not."""

from __future__ import annotations

import io
import json
import logging

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import audit
from monitoring.metrics import AuditCollector
from monitoring.models import AuditEvent
from monitoring.tasks import publish_audit_checkpoint
from stagegate.schedule import schedule
from tests import live
from tests.monitoring.test_audit import _tamper, _triggers_off, _write


@pytest.fixture
def checkpoints(settings, tmp_path):
    """Where checkpoints are published in these tests; the lines written there."""
    path = tmp_path / "checkpoints" / "audit.jsonl"
    settings.STAGEGATE_AUDIT_CHECKPOINT_FILE = path
    settings.STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL = ""
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _publish() -> str:
    out = io.StringIO()
    call_command("publish_audit_checkpoint", stdout=out)
    return out.getvalue()


def _verify(*args: str) -> str:
    out = io.StringIO()
    call_command("verify_audit", *args, stdout=out)
    return out.getvalue()


def _rewrite_from(seq: int) -> None:
    """Change every row from ``seq`` on and recompute each one's prev_hash and hash,
    so the chain is consistent with itself again."""
    previous = AuditEvent.objects.filter(seq=seq - 1).values_list("hash", flat=True).first()
    prev_hash = previous or audit.GENESIS_HASH
    with _triggers_off() as cursor:
        for event in AuditEvent.objects.filter(seq__gte=seq).order_by("seq"):
            event.data = {**event.data, "i": -1}
            event.prev_hash = prev_hash
            event.hash = prev_hash = audit.compute_hash(event)
            cursor.execute(
                "UPDATE monitoring_auditevent SET data = %s, prev_hash = %s, hash = %s"
                " WHERE seq = %s",
                [json.dumps(event.data), event.prev_hash, event.hash, event.seq],
            )


# --- publishing ------------------------------------------------------------------------------


def test_publish_appends_the_chains_latest_seq_and_hash(db, checkpoints):
    events = _write(3)

    out = _publish()

    assert out == f"audit checkpoint 3:{events[-1].hash} (appended to {checkpoints})\n"
    assert [(line["seq"], line["hash"]) for line in _lines(checkpoints)] == [(3, events[-1].hash)]


def test_publish_is_idempotent_until_the_chain_grows(db, checkpoints):
    _write(2)
    _publish()
    again = _publish()
    events = _write(1)
    _publish()

    assert "(already last in" in again
    assert [line["seq"] for line in _lines(checkpoints)] == [2, 3]
    assert _lines(checkpoints)[-1]["hash"] == events[0].hash


def test_publish_of_an_empty_chain_is_the_genesis_checkpoint(db, checkpoints):
    _publish()

    assert [(line["seq"], line["hash"]) for line in _lines(checkpoints)] == [
        (0, audit.GENESIS_HASH)
    ]
    assert "0 rows verified" in _verify("--checkpoint", str(checkpoints))


def test_publish_posts_to_the_webhook_and_logs_a_line(db, checkpoints, settings, caplog):
    hook = live.Webhook()
    settings.STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL = hook.url
    events = _write(2)
    try:
        with caplog.at_level(logging.INFO, logger="monitoring.checkpoints"):
            out = _publish()
            _publish()  # the file has it; the webhook hears every run
    finally:
        hook.stop()

    assert out.endswith("; posted to the webhook)\n")
    assert [(b["event"], b["seq"], b["hash"]) for b in hook.bodies] == [
        ("audit.checkpoint", 2, events[-1].hash)
    ] * 2
    assert [r.getMessage() for r in caplog.records] == [f"audit checkpoint 2:{events[-1].hash}"] * 2


def test_publish_to_a_failing_webhook_keeps_the_file_and_fails(db, checkpoints, settings):
    settings.STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL = f"http://127.0.0.1:{live.free_port()}/x"
    _write(1)

    with pytest.raises(CommandError, match="written and logged, but not posted: webhook"):
        _publish()
    assert [line["seq"] for line in _lines(checkpoints)] == [1]


def test_publish_task_is_on_the_shared_schedule_and_idempotent(db, checkpoints, settings):
    settings.STAGEGATE_AUDIT_CHECKPOINT_INTERVAL = 120
    events = _write(2)

    first = publish_audit_checkpoint.apply().get()
    second = publish_audit_checkpoint.apply().get()

    assert (first, second) == (
        {"seq": 2, "hash": events[-1].hash, "appended": True, "posted": False},
        {"seq": 2, "hash": events[-1].hash, "appended": False, "posted": False},
    )
    assert [(job.task, job.every) for job in schedule() if "audit" in job.task] == [
        ("stagegate.publish_audit_checkpoint", 120)
    ]


def test_gauge_reports_the_latest_seq_and_drops_with_a_cut_tail(db):
    def scrape() -> list[tuple[str, float]]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AuditCollector(ttl=0))
        text = generate_latest(registry).decode()
        assert "# HELP stagegate_audit_checkpoint_seq " in text
        assert "# TYPE stagegate_audit_checkpoint_seq gauge" in text
        return [
            (sample.name, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    _write(4)
    before = scrape()
    _tamper("DELETE FROM monitoring_auditevent WHERE seq > 2")

    assert (before, scrape()) == (
        [("stagegate_audit_checkpoint_seq", 4.0)],
        [("stagegate_audit_checkpoint_seq", 2.0)],
    )


# --- verifying against a checkpoint ----------------------------------------------------------


def test_verify_with_a_checkpoint_passes_on_an_intact_chain(db, checkpoints):
    _write(3)
    _publish()
    _write(2)
    _publish()
    _write(1)  # rows after the last checkpoint are verified by the chain alone

    out = _verify("--checkpoint", str(checkpoints))

    assert out == "audit chain intact: 6 rows verified, matching 2 checkpoint(s) up to row #5\n"


def test_verify_with_a_checkpoint_finds_a_cut_tail(db, checkpoints):
    _write(5)
    _publish()
    _tamper("DELETE FROM monitoring_auditevent WHERE seq > 3")

    assert "3 rows verified" in _verify()  # the chain alone cannot tell
    with pytest.raises(CommandError) as refused:
        _verify("--checkpoint", str(checkpoints))
    assert str(refused.value) == (
        "audit chain broken at row #4: rows #4 to #5 are missing: the chain ends at #3, but"
        " a checkpoint has row #5 (its tail was cut) (3 rows before it are intact)"
    )


def test_verify_with_a_checkpoint_finds_a_rewrite_from_a_row_on(db, checkpoints):
    _write(4)
    _publish()
    _write(4)
    _publish()
    _rewrite_from(6)

    assert "8 rows verified" in _verify()  # the chain alone cannot tell
    with pytest.raises(CommandError) as refused:
        _verify("--checkpoint", str(checkpoints))
    assert str(refused.value).startswith(
        "audit chain broken at row #8: its hash is not the checkpoint's (8:"
    )
    assert str(refused.value).endswith(
        "the chain was rewritten from a row between #5 and #8 on, and rehashed"
        " (7 rows before it are intact)"
    )


def test_verify_with_a_seq_hash_literal(db):
    events = _write(4)
    _rewrite_from(2)

    with pytest.raises(CommandError, match=r"broken at row #3: its hash is not the checkpoint's"):
        _verify("--checkpoint", f"3:{events[2].hash}")
    assert "4 rows verified" in _verify("--checkpoint", f"3:{AuditEvent.objects.get(seq=3).hash}")


def test_verify_finds_a_cut_tail_that_new_rows_replaced(db, checkpoints):
    """The tail cut, then as many rows written again: the row count is back, but the
    two checkpoints of the same row disagree."""
    _write(3)
    _publish()
    _tamper("DELETE FROM monitoring_auditevent WHERE seq = 3")
    _write(1)
    _publish()

    with pytest.raises(CommandError, match=r"two checkpoints name different hashes for row #3"):
        _verify("--checkpoint", str(checkpoints))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is neither seq:hash nor a readable file"),
        ("", "holds no checkpoint"),
        ('{"seq": 1}\n', "line 1: not a checkpoint"),
        ('\n{"seq": -1, "hash": "' + "a" * 64 + '"}\n', "line 2: seq must be a whole number"),
        ("1:" + "A" * 64 + "\n", "line 1: not a checkpoint"),
    ],
)
def test_verify_refuses_a_checkpoint_it_cannot_read(db, tmp_path, content, message):
    path = tmp_path / "checkpoints.jsonl"
    if content is not None:
        path.write_text(content)

    with pytest.raises(CommandError, match=rf"^checkpoint refused: .*{message}"):
        _verify("--checkpoint", str(path))
