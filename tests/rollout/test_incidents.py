"""Incidents (``rollout.incidents``): filing and resolving them, audited, and their
listing in the REST API.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

from monitoring.models import AuditEvent
from rollout.incidents import file_incident, resolve_incident
from rollout.models import Incident


def test_low_incident_does_not_trip(mini, rita):
    file_incident(mini, severity="low", title="typo in docs", actor=rita)

    mini.refresh_from_db()
    assert mini.state == "active"


def test_resolving_an_incident_is_audited(mini, login_as, rita):
    incident = file_incident(mini, severity="low", title="slow answers", actor=rita)

    response = login_as(rita).post(
        f"/api/incidents/{incident.public_id}/resolve/",
        {"resolution": "upstream scaled up"},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["status"] == "resolved"
    assert AuditEvent.objects.filter(action="incident.resolved").count() == 1


def test_incident_list_filters_by_status(mini, login_as, rita, vera):
    resolved = file_incident(mini, severity="low", title="slow answers", actor=rita)
    resolve_incident(resolved, actor=rita, resolution="upstream scaled up")
    still_open = file_incident(mini, severity="medium", title="odd refusals", actor=rita)

    response = login_as(vera).get("/api/incidents/", {"status": "open"})

    assert response.status_code == 200
    assert [(i["public_id"], i["status"]) for i in response.json()["results"]] == [
        (still_open.public_id, "open")
    ]


def test_viewer_reads_incidents_but_cannot_file_one(mini, login_as, rita, vera):
    file_incident(mini, severity="low", title="slow answers", actor=rita)
    client = login_as(vera)

    listed = client.get("/api/incidents/")
    filed = client.post(
        "/api/incidents/",
        {"release": "atlas-mini", "severity": "critical", "title": "nope"},
        format="json",
    )

    assert (listed.status_code, len(listed.json()["results"])) == (200, 1)
    assert filed.status_code == 403
    assert Incident.objects.count() == 1
