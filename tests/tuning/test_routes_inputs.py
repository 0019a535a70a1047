"""Bad input on the files and fine-tuning routes (tuning/views.py): every refusal a clear
4xx in OpenAI's error shape with a stable code, never a 500, and nothing stored."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from access.keys import generate_key, issue_key
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN, make_org
from tuning.models import FineTuningJob, TrainingFile

pytestmark = pytest.mark.django_db

GOOD_ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'  # noqa: E501
RAW_KEY, _ = generate_key()  # key-shaped text: a key no one holds
SECRETISH = RAW_KEY.rpartition("_")[2]  # its secret part


@pytest.fixture
def partner(client):
    org = make_org("northwind-research", "research_partner")
    apply_plan(EXAMPLE_PLAN.read_text(), actor=None)
    key = issue_key(organization=org, name="test", actor=None).raw_key
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def error(response) -> dict:
    assert response["content-type"] == "application/json"
    body = response.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"}
    return body


def post_file(client, auth, content: bytes, purpose: str = "fine-tune", name: str = "t.jsonl"):
    upload = SimpleUploadedFile(name, content, content_type="application/jsonl")
    return client.post("/v1/files", {"purpose": purpose, "file": upload}, **auth)


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic abc", f"Bearer {RAW_KEY}", "Bearer sgk_\x00bad"],
)
def test_routes_refuse_a_missing_or_bad_key_with_401(client, partner, header):
    auth = {"HTTP_AUTHORIZATION": header} if header else {}

    for response in (
        client.get("/v1/files", **auth),
        client.post("/v1/fine_tuning/jobs", b"{}", content_type="application/json", **auth),
        client.get("/v1/fine_tuning/jobs/ftjob-x/events", **auth),
    ):
        assert response.status_code == 401
        assert error(response)["code"] in {"invalid_key", "key_revoked", "key_expired"}
        assert SECRETISH not in response.content.decode()


@pytest.mark.parametrize(
    "content, code",
    [
        (b"", "invalid_training_file"),
        (b"\xff\xfe\x00garbage\n", "invalid_training_file"),
        (b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}\n', "invalid_training_file"),
        (b"[" * 10_000 + b"]" * 10_000 + b"\n", "invalid_training_file"),
        (b'{"messages": ' + b"9" * 5000 + b"}\n", "invalid_training_file"),
        (GOOD_ROW + b"\n\n" + GOOD_ROW, "invalid_training_file"),
    ],
)
def test_a_bad_training_file_is_refused_and_not_stored(client, partner, content, code):
    response = post_file(client, partner, content)

    assert response.status_code == 400
    assert error(response)["code"] == code
    assert TrainingFile.objects.count() == 0


def test_a_file_with_another_purpose_or_without_a_file_is_refused(client, partner):
    assert error(post_file(client, partner, GOOD_ROW, purpose="assistants"))["code"] == (
        "invalid_purpose"
    )
    missing = client.post("/v1/files", {"purpose": "fine-tune"}, **partner)
    assert (missing.status_code, error(missing)["code"]) == (400, "invalid_request")
    raw = client.post("/v1/files", b"\x00\xff", content_type="application/octet-stream", **partner)
    assert (raw.status_code, error(raw)["code"]) == (400, "invalid_request")
    broken = client.generic(
        "POST", "/v1/files", b"--x\r\nnonsense", content_type="multipart/form-data; boundary=x",
        **partner,
    )  # fmt: skip
    assert broken.status_code == 400
    assert TrainingFile.objects.count() == 0


def test_a_key_in_a_file_name_is_never_stored(client, partner):
    response = post_file(client, partner, GOOD_ROW, name=f"{RAW_KEY}.jsonl")

    assert response.status_code == 200
    assert SECRETISH not in response.content.decode()
    assert SECRETISH not in TrainingFile.objects.get().filename


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        b"{" * 100_000,
        json.dumps({"model": "atlas-2"}).encode(),
        json.dumps({"model": "atlas-2\x00", "training_file": "file-x"}).encode(),
        json.dumps({"model": 10**400, "training_file": "file-x"}).encode(),
        json.dumps({"model": "atlas-2", "training_file": "file-x", "seed": 10**40}).encode(),
        json.dumps({"model": "atlas-2", "training_file": "file-x", "seed": True}).encode(),
        json.dumps({"model": "atlas-2", "training_file": ["file-x"]}).encode(),
        json.dumps({"model": "atlas-2", "training_file": "f", "validation_file": "f"}).encode(),
        json.dumps(
            {"model": "atlas-2", "training_file": "file-x", "suffix": "Bad Suffix"}
        ).encode(),
        json.dumps({"model": "atlas-2", "training_file": RAW_KEY}).encode(),
    ],
)
def test_a_bad_job_request_is_refused_with_a_stable_code(client, partner, body):
    response = client.post("/v1/fine_tuning/jobs", body, content_type="application/json", **partner)

    assert 400 <= response.status_code < 500
    assert error(response)["code"]
    assert SECRETISH not in response.content.decode()
    assert FineTuningJob.objects.count() == 0


def test_bad_hyperparameters_are_refused(client, partner):
    training_file = post_file(client, partner, GOOD_ROW).json()["id"]
    for hyperparameters in ({"n_epochs": -1}, {"n_epochs": "many"}, {"bogus": 1}, [1], 5):
        response = client.post(
            "/v1/fine_tuning/jobs",
            {
                "model": "atlas-2",
                "training_file": training_file,
                "hyperparameters": hyperparameters,
            },
            content_type="application/json",
            **partner,
        )
        assert (response.status_code, error(response)["code"]) == (400, "invalid_hyperparameters")
    assert FineTuningJob.objects.count() == 0


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1000", "1e3", "\x00"])
def test_list_limits_are_checked(client, partner, limit):
    for path in ("/v1/fine_tuning/jobs", "/v1/files"):
        response = client.get(path, {"limit": limit}, **partner)
        assert (response.status_code, error(response)["code"]) == (400, "invalid_request")


def test_unknown_ids_and_methods(client, partner):
    for path in (
        "/v1/files/file-nope",
        "/v1/fine_tuning/jobs/ftjob-nope",
        "/v1/fine_tuning/jobs/ftjob-nope/events",
        "/v1/fine_tuning/jobs/%00/events",
    ):
        response = client.get(path, **partner)
        assert response.status_code == 404, path
        assert error(response)["code"].endswith("not_found")
    wrong = client.delete("/v1/fine_tuning/jobs", **partner)
    assert (wrong.status_code, error(wrong)["code"]) == (405, "method_not_allowed")
    cancel = client.get("/v1/fine_tuning/jobs/ftjob-nope/cancel", **partner)
    assert cancel.status_code == 405


def test_a_database_outage_is_a_503_and_stores_nothing(client, partner):
    from django.db import OperationalError, connection

    def unreachable(execute, sql, params, many, context):
        raise OperationalError("the database went away")

    with connection.execute_wrapper(unreachable):
        upload = post_file(client, partner, GOOD_ROW)
        listing = client.get("/v1/fine_tuning/jobs", **partner)

    for response in (upload, listing):
        assert (response.status_code, error(response)["code"]) == (503, "service_unavailable")
    assert TrainingFile.objects.count() == 0
