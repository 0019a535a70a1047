"""Where signing in lands: staff on the board, an org admin (for whom the board is
closed) on their organizations, and an explicit ``next`` wins for everyone."""

from __future__ import annotations

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("who", "landing"),
    [("ada", "/console/"), ("vera", "/console/"), ("oscar", "/console/orgs/")],
)
def test_signing_in_lands_on_a_page_the_role_may_open(who, landing, request):
    request.getfixturevalue(who)
    browser = Client()

    answer = browser.post("/console/login/", {"username": who, "password": f"{who}-pass-9137"})

    assert (answer.status_code, answer["Location"]) == (302, landing)
    assert browser.get(landing).status_code == 200


def test_a_next_page_wins_over_the_landing(oscar):
    browser = Client()
    answer = browser.post(
        "/console/login/",
        {"username": "oscar", "password": "oscar-pass-9137", "next": "/console/keys/"},
    )
    assert answer["Location"] == "/console/keys/"


def test_a_signed_in_org_admin_opening_the_login_page_goes_to_their_organizations(oscar):
    browser = Client()
    browser.force_login(oscar)
    answer = browser.get("/console/login/")
    assert (answer.status_code, answer["Location"]) == (302, "/console/orgs/")
