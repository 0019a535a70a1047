"""The shared cast: four organizations (one per tier), staff of each role, two org
admins, and the release atlas-2 on the example plan (docs/examples/atlas-2.yaml)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.factories import EXAMPLE_PLAN, make_org, make_user


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2's deliberate slowness costs a second per test user; tests need no strength."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _tasks_run_here(settings):
    """Work enqueued after a commit (notifications) runs in the test's process, not on a
    broker no worker reads; tests of the Celery worker (tests/test_celery.py) say so."""
    settings.STAGEGATE_SCHEDULER = "off"


@pytest.fixture
def northwind(db):
    return make_org("northwind-research", "research_partner")


@pytest.fixture
def acme(db):
    return make_org("acme-commercial", "verified_commercial")


@pytest.fixture
def tartu(db):
    return make_org("tartu-university", "credentialed_academic")


@pytest.fixture
def publicdev(db):
    return make_org("public-dev", "public")


@pytest.fixture
def ada(db):
    """Rollout admin."""
    return make_user("ada", roles=("rollout_admin",))


@pytest.fixture
def rita(db):
    """Reviewer."""
    return make_user("rita", roles=("reviewer",))


@pytest.fixture
def vera(db):
    """Viewer."""
    return make_user("vera", roles=("viewer",))


@pytest.fixture
def oscar(northwind):
    """Org admin of northwind-research."""
    return make_user("oscar", org_admin_of=(northwind,))


@pytest.fixture
def olga(acme):
    """Org admin of acme-commercial."""
    return make_user("olga", org_admin_of=(acme,))


@pytest.fixture
def nobody(db):
    """Signed in, no role, no membership."""
    return make_user("nobody")


@pytest.fixture
def release(db, ada):
    """atlas-2 on the example plan, in its first stage."""
    from rollout.models import Release
    from rollout.plans import apply_plan

    apply_plan(EXAMPLE_PLAN.read_text(), actor=ada)
    return Release.objects.get(name="atlas-2")


@pytest.fixture
def api():
    """A DRF client; log in with ``api.force_login(user)`` or ``login_as``."""
    return APIClient()


@pytest.fixture
def login_as(api):
    def login(user):
        api.force_authenticate(user=None)
        api.force_login(user)
        return api

    return login


# --- Live servers (tests/live.py): real processes on free ports -------------------------------


@pytest.fixture(scope="session")
def demo_upstream():
    """The built-in demo model server, one per test session."""
    from tests.live import DemoUpstream

    upstream = DemoUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def proxy_server(django_db_setup, django_db_blocker):
    """Stagegate (``python -m stagegate.serve``) on the test database, one per module."""
    from tests.live import ProxyServer

    with django_db_blocker.unblock():
        server = ProxyServer()
    yield server
    server.stop()


@pytest.fixture
def _audit_triggers_back(django_db_blocker):
    """Set up before ``transactional_db``, so torn down after its flush: the audit
    triggers ``live_db`` drops for the flush are back for the tests that follow."""
    yield
    from tests.live import restore_audit_triggers

    with django_db_blocker.unblock():
        restore_audit_triggers()


@pytest.fixture
def live_db(_audit_triggers_back, transactional_db):
    """Committed data a server process can read; emptied after the test."""
    from tests.live import drop_audit_triggers

    yield
    drop_audit_triggers()
