"""The OpenAPI schema matches the API: schemathesis (``--checks all``, a few examples
per operation, a fixed seed) against a live server finds nothing.

The server (tests/live.py) serves the test database with the demo seeded
(``seed_demo``); schemathesis signs in as the demo's rollout admin with the session
cookie and CSRF token that logging in through /admin/login/ gives, passed in the
environment to tests/schemathesis.toml. By hand, against ``make run``::

    export STAGEGATE_SESSIONID=<sessionid cookie> STAGEGATE_CSRFTOKEN=<csrftoken cookie>
    .venv/bin/schemathesis --config-file tests/schemathesis.toml run \\
        'http://127.0.0.1:8000/api/schema/?format=json' --checks all --max-examples 10 \\
        --generation-with-security-parameters false
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.conf import global_settings
from django.contrib.auth.models import Group, User
from django.core.management import call_command

from stagegate.roles import STAFF_ROLES

CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
PASSWORD = "schemathesis-admin-4821"
# Ten examples per operation and phase: about 1,500 requests, half a minute.
MAX_EXAMPLES = 10


@pytest.fixture
def demo(live_db, settings):
    """The demo data, with a known password for its rollout admin ("admin")."""
    # Hashed as the server checks it (tests elsewhere hash with MD5 for speed).
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    for role in STAFF_ROLES:  # a flush after an earlier live test removes them
        Group.objects.get_or_create(name=role)
    call_command("seed_demo", stdout=io.StringIO())
    admin = User.objects.get(username="admin")
    admin.set_password(PASSWORD)
    admin.save(update_fields=["password"])


def _log_in(base_url: str) -> tuple[str, str]:
    """(sessionid, csrftoken) of the admin, logged in through the login form."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        page = client.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        reply = client.post(
            "/admin/login/",
            data={"csrfmiddlewaretoken": token, "username": "admin", "password": PASSWORD},
        )
        assert reply.status_code == 302, reply.text
        assert client.get("/api/").status_code == 200
        return client.cookies["sessionid"], client.cookies["csrftoken"]


def test_schemathesis_finds_no_failure(demo, proxy_server, tmp_path):
    session, csrf = _log_in(proxy_server.url)
    environment = {
        **os.environ,
        "STAGEGATE_SESSIONID": session,
        "STAGEGATE_CSRFTOKEN": csrf,
    }

    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            f"{proxy_server.url}/api/schema/?format=json",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "1",
            # The session cookie is the admin's throughout: the security scheme's
            # cookie is not itself a parameter to fuzz (anonymous calls get 401,
            # tests/test_api_inputs.py).
            "--generation-with-security-parameters",
            "false",
            "--generation-database",
            "none",
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )

    summary = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    selected = re.search(r"Selected: (\d+)/(\d+)", result.stdout)
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert selected and tested, summary
    # Every operation of the schema was exercised, none filtered out or skipped.
    assert selected.group(1) == selected.group(2) == tested.group(1), summary
