"""Flagged samples (monitoring/flags.py): a reviewer decides a pending sample once, with
its audit row; others are refused; the queue filters by release, category and status;
a review's counts; the retention sweep deletes what expired, audited as a count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from monitoring.audit import ObjectType, verify_chain
from monitoring.flags import decide_sample, delete_expired_samples, review_queue, sample_counts
from monitoring.models import AuditEvent, FlaggedSample
from monitoring.usage import write_samples
from stagegate.errors import Refused
from tests.factories import flag_sample

BASE = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _write(*samples) -> list[FlaggedSample]:
    write_samples(list(samples))
    return list(FlaggedSample.objects.order_by("created_at", "id"))


def _sample(minutes: int, **fields):
    return flag_sample(
        at=BASE + timedelta(minutes=minutes),
        release=fields.pop("release", "atlas-2"),
        stage=fields.pop("stage", "research_preview"),
        **fields,
    )


@pytest.mark.django_db
def test_a_reviewer_confirms_a_pending_sample_with_its_audit_row(rita):
    (sample,) = _write(_sample(1, categories="cyber,weapons"))

    decided = decide_sample(sample, decision="confirmed", actor=rita, note="clear intent")

    sample.refresh_from_db()
    assert (sample.status, sample.decided_by, sample.note) == ("confirmed", rita, "clear intent")
    assert sample.decided_at is not None
    assert decided == sample
    row = AuditEvent.objects.get(object_type=ObjectType.FLAGGED_SAMPLE)
    assert (row.action, row.actor, row.object_id) == ("flag_confirmed", "rita", str(sample.pk))
    assert row.data == {
        "release": "atlas-2",
        "stage": "research_preview",
        "categories": "cyber,weapons",
        "action": "flag",
        "source": "prompt",
        "request_id": sample.request_id,
        "org": "org_test",
        "note": "clear intent",
    }
    assert verify_chain() == (1, None)


@pytest.mark.django_db
def test_a_decided_sample_is_not_decided_again(rita):
    (sample,) = _write(_sample(1))
    decide_sample(sample.pk, decision="dismissed", actor=rita)

    with pytest.raises(Refused) as refused:
        decide_sample(sample.pk, decision="confirmed", actor=rita)

    assert (refused.value.code, refused.value.status) == ("sample_decided", 409)
    sample.refresh_from_db()
    assert sample.status == "dismissed"
    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["flag_dismissed"]


@pytest.mark.django_db
def test_only_reviewers_decide_samples(ada, vera, rita):
    (sample,) = _write(_sample(1))
    for user in (ada, vera):
        with pytest.raises(Refused) as refused:
            decide_sample(sample, decision="confirmed", actor=user)
        assert (refused.value.code, refused.value.status) == ("not_a_reviewer", 403)
    with pytest.raises(Refused) as missing:
        decide_sample(sample.pk + 1, decision="confirmed", actor=rita)
    assert (missing.value.code, missing.value.status) == ("sample_not_found", 404)
    with pytest.raises(ValueError):
        decide_sample(sample, decision="pending", actor=rita)
    sample.refresh_from_db()
    assert (sample.status, AuditEvent.objects.count()) == ("pending", 0)


@pytest.mark.django_db
def test_a_note_quoting_a_key_is_kept_redacted(rita):
    (sample,) = _write(_sample(1))
    secret = "sgk_0123456789abcdef_" + "Ab1" * 15
    decide_sample(sample, decision="confirmed", actor=rita, note=f"leaked {secret}")
    sample.refresh_from_db()
    assert sample.note == "leaked sgk_0123456789abcdef_[redacted]"


@pytest.mark.django_db
def test_review_queue_filters_by_release_category_and_status(rita):
    samples = _write(
        _sample(1, categories="cyber"),
        _sample(2, categories="cyber/intrusion"),
        _sample(3, categories="violence,weapons"),
        _sample(4, categories="cyber,weapons", release="boreas-1"),
        _sample(5, categories="weapons"),
    )
    decide_sample(samples[4], decision="dismissed", actor=rita)

    def minutes(queryset) -> list[int]:
        return [int((s.created_at - BASE) / timedelta(minutes=1)) for s in queryset]

    assert minutes(review_queue()) == [4, 3, 2, 1]  # pending, newest first
    assert minutes(review_queue(category="cyber")) == [4, 1]
    assert minutes(review_queue(category="weapons")) == [4, 3]
    assert minutes(review_queue(category="weapons", status="")) == [5, 4, 3]
    assert minutes(review_queue(status="dismissed")) == [5]
    assert minutes(review_queue(release="boreas-1")) == [4]
    assert minutes(review_queue(releases=["atlas-2"], category="cyber")) == [1]
    assert minutes(review_queue(releases=[])) == []


@pytest.mark.django_db
def test_sample_counts_by_status_and_admitted_requests(rita):
    samples = _write(
        _sample(1, request_id="req-a"),
        _sample(1, request_id="req-a", source="response"),  # the same request's answer
        _sample(2, request_id="req-b", action="route"),
        _sample(3, request_id="req-c", action="block"),  # never admitted
        _sample(4, request_id="req-d"),
        _sample(5, request_id="req-e"),
        _sample(6, request_id="req-f", stage="commercial"),  # another stage
        _sample(70, request_id="req-g"),  # after the period
    )
    for sample in samples[:4]:
        decide_sample(sample, decision="confirmed", actor=rita)
    decide_sample(samples[4], decision="dismissed", actor=rita)

    counts = sample_counts(
        release="atlas-2",
        stage="research_preview",
        since=BASE,
        until=BASE + timedelta(hours=1),
    )

    assert counts.as_dict() == {
        "pending": 1,
        "confirmed": 4,
        "dismissed": 1,
        "confirmed_requests": 2,  # req-a (twice) and req-b; req-c was blocked
        "pending_requests": 1,
    }


@pytest.mark.django_db
def test_delete_expired_samples_deletes_them_whatever_their_status_and_audits_a_count(rita):
    samples = _write(
        _sample(0, retain_days=1),
        _sample(1, retain_days=1),
        _sample(2, retain_days=2),
    )
    decide_sample(samples[0], decision="confirmed", actor=rita)
    now = BASE + timedelta(days=1, minutes=1)

    assert delete_expired_samples(now=now) == 2
    assert delete_expired_samples(now=now) == 0

    assert list(FlaggedSample.objects.values_list("pk", flat=True)) == [samples[2].pk]
    row = AuditEvent.objects.get(action="flag_samples_expired")
    assert (row.actor, row.object_type, row.data) == (
        "system:retention",
        "flagged_sample",
        {"deleted": 2, "by_status": {"confirmed": 1, "pending": 1}, "until": now.isoformat()},
    )
