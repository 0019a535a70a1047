"""OpenAI's files and fine-tuning routes, gated by the rollout, in OpenAI's shapes so the
official client works unchanged:

``POST /v1/files``, ``GET /v1/files``, ``GET /v1/files/{id}``, ``POST /v1/fine_tuning/jobs``,
``GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``,
``POST /v1/fine_tuning/jobs/{id}/cancel``, ``GET /v1/fine_tuning/jobs/{id}/events``.

They are Django views (they read and write the database; the proxy's model calls never
do), authenticated by the same API keys, and every refusal is OpenAI's error shape with
a stable code. A job object carries Stagegate's own facts under ``stagegate`` (the
stage and tier it was gated under, the screening verdict, the tuned model's state).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.db import DatabaseError, InterfaceError
from django.http import HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt

from access.proxy.common import error_body
from monitoring.redaction import redact_secrets
from stagegate.errors import Refused
from tuning import services
from tuning.models import FineTuningJob, JobStatus, TrainingFile, TunedModel

log = logging.getLogger(__name__)

MAX_LIST = 100
MAX_JSON_BYTES = 64 * 1024


def _json(status: int, body: Any) -> HttpResponse:
    return HttpResponse(json.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, param: str | None = None) -> HttpResponse:
    # A message may quote what the caller sent (an id): never an API key's secret.
    return HttpResponse(
        error_body(status, code, redact_secrets(message), param),
        status=status,
        content_type="application/json",
    )


def _route(*methods: str) -> Callable:
    """A view of ``methods`` called with the authenticated caller; every refusal in
    OpenAI's error shape."""

    def wrap(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def handle(request: HttpRequest, **kwargs) -> HttpResponse:
            if request.method not in methods:
                return _error(405, "method_not_allowed", f"Use {' or '.join(methods)}.")
            header = request.headers.get("authorization", "")
            scheme, _, raw_key = header.partition(" ")
            if scheme.lower() != "bearer" or not raw_key.strip():
                return _error(
                    401, "invalid_key", "Provide your API key as 'Authorization: Bearer <key>'."
                )
            try:
                caller = services.authenticate(raw_key.strip())
                return view(request, caller, **kwargs)
            except Refused as exc:
                return _error(exc.status, exc.code, exc.message, exc.field)
            except (DatabaseError, InterfaceError):
                # Each write is one transaction: nothing half-stored to clean up.
                log.warning("fine-tuning route %s: database unavailable", request.path)
                return _error(
                    503,
                    "service_unavailable",
                    "Stagegate cannot reach its database; nothing was stored. Try again shortly.",
                )

        return handle

    return wrap


def _body(request: HttpRequest) -> dict[str, Any]:
    if len(request.body) > MAX_JSON_BYTES:
        raise Refused("request_too_large", "The request body is too large.", status=413)
    try:
        document = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise Refused("invalid_json", "The request body is not valid JSON.", status=400) from None
    if not isinstance(document, dict):
        raise Refused("invalid_json", "The request body must be a JSON object.", status=400)
    return document


def _string(document: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = document.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 200:
        raise Refused(
            "invalid_request",
            f"{name} must be a string of 1 to 200 characters.",
            status=400,
            field=name,
        )
    return value


def _limit(request: HttpRequest) -> int:
    raw = request.GET.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
        raise Refused(
            "invalid_request", f"limit must be 1 to {MAX_LIST}.", status=400, field="limit"
        )
    return int(raw)


# --- objects ------------------------------------------------------------------------------


def _time(value) -> int | None:
    return None if value is None else int(value.timestamp())


def file_object(training_file: TrainingFile) -> dict[str, Any]:
    return {
        "id": training_file.public_id,
        "object": "file",
        "bytes": training_file.bytes,
        "created_at": _time(training_file.created_at),
        "expires_at": None,
        "filename": training_file.filename,
        "purpose": training_file.purpose,
        "status": "processed",
        "status_details": None,
    }


def job_object(job: FineTuningJob) -> dict[str, Any]:
    failed = job.status == JobStatus.FAILED
    try:
        tuned = job.tuned_model  # selected with the job (services.get_job, the list)
    except TunedModel.DoesNotExist:
        tuned = None
    hyperparameters = job.hyperparameters or {}
    return {
        "id": job.public_id,
        "object": "fine_tuning.job",
        "created_at": _time(job.created_at),
        "error": (
            {
                "code": job.error_code or "failed",
                "message": job.error_message,
                "param": job.error_param or None,
            }
            if failed
            else None
        ),
        "fine_tuned_model": job.fine_tuned_model or None,
        "finished_at": _time(job.finished_at),
        "hyperparameters": hyperparameters,
        "model": job.release.name,
        "organization_id": job.organization.public_id,
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file.public_id,
        "validation_file": None,
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": job.suffix or None,
        "stagegate": {
            "stage": job.stage,
            "tier": job.tier,
            "verdict": job.verdict or None,
            "verdict_reason": job.verdict_reason or None,
            "rows": {
                "total": job.rows_total,
                "flagged": job.rows_flagged,
                "blocked": job.rows_blocked,
                "kept": job.rows_kept,
            },
            "dataset_review": job.dataset_review or None,
            "tuned_model_status": tuned.status if tuned else None,
            "held_reason": (tuned.held_reason or None) if tuned else None,
        },
    }


# --- files --------------------------------------------------------------------------------


@_route("GET", "POST")
def files(request: HttpRequest, caller: services.Caller) -> HttpResponse:
    if request.method == "GET":
        rows = TrainingFile.objects.filter(organization_id=caller.api_key.organization_id).defer(
            "content"
        )[: _limit(request)]
        return _json(200, {"object": "list", "data": [file_object(f) for f in rows]})
    declared = request.META.get("CONTENT_LENGTH") or "0"
    maximum = settings.STAGEGATE_MAX_TRAINING_FILE_BYTES
    if declared.isdigit() and int(declared) > maximum + 64 * 1024:
        return _error(
            413, "file_too_large", f"Training files are at most {maximum:,} bytes.", "file"
        )
    if not request.content_type.startswith("multipart/form-data"):
        return _error(
            400,
            "invalid_request",
            "Upload the file as multipart/form-data with fields 'purpose' and 'file'.",
            "file",
        )
    try:
        purpose = request.POST.get("purpose", "")
        upload = request.FILES.get("file")
    except (MultiPartParserError, RequestDataTooBig, TooManyFieldsSent, SuspiciousOperation,
            UnicodeDecodeError, ValueError):  # fmt: skip
        return _error(400, "invalid_request", "The multipart body could not be read.", "file")
    if upload is None:
        return _error(400, "invalid_request", "The form has no 'file' field.", "file")
    if upload.size > maximum:
        return _error(
            413, "file_too_large", f"Training files are at most {maximum:,} bytes.", "file"
        )
    training_file = services.upload_file(
        caller=caller, filename=upload.name or "", purpose=purpose, data=upload.read()
    )
    return _json(200, file_object(training_file))


@_route("GET")
def file_detail(request: HttpRequest, caller: services.Caller, file_id: str) -> HttpResponse:
    return _json(200, file_object(services.get_file(caller=caller, file_id=file_id)))


# --- jobs ---------------------------------------------------------------------------------


@_route("GET", "POST")
def jobs(request: HttpRequest, caller: services.Caller) -> HttpResponse:
    if request.method == "GET":
        limit = _limit(request)
        rows = FineTuningJob.objects.filter(
            organization_id=caller.api_key.organization_id
        ).select_related("release", "training_file", "organization", "tuned_model")
        after = request.GET.get("after")
        if after:
            anchor = services.get_job(caller=caller, job_id=after)
            rows = rows.filter(created_at__lte=anchor.created_at).exclude(
                created_at=anchor.created_at, pk__gte=anchor.pk
            )
        page = list(rows.order_by("-created_at", "-id")[: limit + 1])
        return _json(
            200,
            {
                "object": "list",
                "data": [job_object(job) for job in page[:limit]],
                "has_more": len(page) > limit,
            },
        )
    document = _body(request)
    if document.get("validation_file") is not None:
        raise Refused(
            "unsupported_parameter",
            "validation_file is not supported; the assessment judges tuned models.",
            status=400,
            field="validation_file",
        )
    seed = document.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31
    ):
        raise Refused(
            "invalid_request", "seed must be an integer from 0 to 2147483647.", status=400,
            field="seed",
        )  # fmt: skip
    job = services.create_job(
        caller=caller,
        model=_string(document, "model"),
        training_file=_string(document, "training_file"),
        suffix=_string(document, "suffix", required=False),
        seed=seed,
        hyperparameters=document.get("hyperparameters"),
    )
    job.refresh_from_db()
    return _json(200, job_object(job))


@_route("GET")
def job_detail(request: HttpRequest, caller: services.Caller, job_id: str) -> HttpResponse:
    return _json(200, job_object(services.get_job(caller=caller, job_id=job_id)))


@_route("POST")
def job_cancel(request: HttpRequest, caller: services.Caller, job_id: str) -> HttpResponse:
    return _json(200, job_object(services.cancel_job(caller=caller, job_id=job_id)))


@_route("GET")
def job_events(request: HttpRequest, caller: services.Caller, job_id: str) -> HttpResponse:
    job = services.get_job(caller=caller, job_id=job_id)
    limit = _limit(request)
    rows = job.events.all()
    after = request.GET.get("after")
    if after:
        anchor = job.events.filter(public_id=after).first()
        if anchor is None:
            raise Refused("event_not_found", f"No event with id '{after}'.", status=404)
        rows = rows.filter(pk__lt=anchor.pk)
    page = list(rows.order_by("-created_at", "-id")[: limit + 1])
    return _json(
        200,
        {
            "object": "list",
            "data": [
                {
                    "id": row.public_id,
                    "object": "fine_tuning.job.event",
                    "created_at": _time(row.created_at),
                    "level": row.level,
                    "message": row.message,
                    "data": row.data or {},
                    "type": "message",
                }
                for row in page[:limit]
            ],
            "has_more": len(page) > limit,
        },
    )
