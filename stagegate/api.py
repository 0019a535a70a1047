"""Shared REST API plumbing: one error shape for every failure, cursor pagination.

Every error response body is::

    {"error": {"code": "<stable snake_case>", "message": "<one line>", "details": ...}}

``details`` appears only when there is more to say: DRF's field errors for
``invalid``, the list of plan errors for ``plan_invalid``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, serializers
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import set_rollback

from rollout.plan_schema import PlanInvalid
from stagegate.errors import Refused

# Codes of DRF's own exceptions that we rename; every other APIException keeps the
# code it was raised with (``default_code`` unless the raiser chose one).
_RENAMED_CODES = {"authentication_failed": "not_authenticated"}


class Conflict(exceptions.APIException):
    """The request is well formed but the object's state does not allow it."""

    status_code = 409
    default_detail = "The request conflicts with the object's current state."
    default_code = "conflict"


def error_body(code: str, message: str, details: Any = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def _first_message(detail: Any) -> str:
    """The first leaf message of a (possibly nested) DRF error detail."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key == "non_field_errors" else f"{key}: {inner}"
        return ""
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else ""
    return str(detail)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Turn API errors into the one error shape; anything else stays a 500."""
    if isinstance(exc, PlanInvalid):
        set_rollback()
        errors = [asdict(error) for error in exc.errors]
        count = len(errors)
        first = f": {errors[0]['path']}: {errors[0]['message']}" if errors else ""
        message = f"the rollout plan has {count} error{'s' if count != 1 else ''}{first}"
        return Response(error_body("plan_invalid", _one_line(message), errors), status=400)

    if isinstance(exc, Refused):
        set_rollback()
        return Response(error_body(exc.code, _one_line(exc.message)), status=exc.status)

    if isinstance(exc, Http404):
        # One message for every 404, so it never says what kind of object was missing.
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if not isinstance(exc, exceptions.APIException):
        return None

    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = f"{exc.wait:.0f}"
    set_rollback()

    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail
        first = _first_message(detail)
        message = f"invalid input: {first}" if first else "invalid input"
        return Response(
            error_body("invalid", _one_line(message), detail),
            status=exc.status_code,
            headers=headers,
        )

    detail = exc.detail
    code = getattr(detail, "code", None) or exc.default_code
    code = _RENAMED_CODES.get(code, code)
    message = _first_message(detail) or str(exc.default_detail)
    return Response(error_body(code, _one_line(message)), status=exc.status_code, headers=headers)


def cursor_pagination(ordering: str | tuple[str, ...]) -> type[CursorPagination]:
    """A CursorPagination ordered by ``ordering`` (DRF's default, ``-created``,
    names a field our models do not have)."""
    return type(
        "CursorPagination",
        (CursorPagination,),
        {"ordering": ordering, "__module__": __name__},
    )


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.JSONField(required=False)


class ErrorSerializer(serializers.Serializer):
    """The body of every error response (for the OpenAPI schema)."""

    error = ErrorDetailSerializer()
