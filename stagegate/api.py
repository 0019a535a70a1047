"""Shared REST API plumbing: one error shape for every failure, cursor pagination
that refuses crafted cursors, and the edge of ``/api/`` (``ApiEdgeMiddleware``).

Every error response body is::

    {"error": {"code": "<stable snake_case>", "message": "<one line>", "details": ...}}

``details`` appears only when there is more to say: DRF's field errors for
``invalid``, the list of plan errors for ``plan_invalid``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.http import Http404, HttpResponse, HttpResponseNotFound, JsonResponse
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, pagination, serializers
from rest_framework.response import Response
from rest_framework.views import set_rollback

from rollout.plan_schema import PlanInvalid
from stagegate.errors import Refused

# Codes of DRF's own exceptions that we rename; every other APIException keeps the
# code it was raised with (``default_code`` unless the raiser chose one).
_RENAMED_CODES = {"authentication_failed": "not_authenticated"}


API_PREFIX = "/api/"
# C0 controls and DEL: no id, filter value or ordering position has them, and
# PostgreSQL text refuses NUL outright (a 500 where the input should have been refused).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_CHARACTERS_REFUSED = "Control characters are not allowed."


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


def _codes(detail: Any) -> set[str]:
    """Every code in a (possibly nested) DRF error detail."""
    if isinstance(detail, dict):
        return set().union(*(_codes(value) for value in detail.values()))
    if isinstance(detail, list):
        return set().union(*(_codes(value) for value in detail))
    return {getattr(detail, "code", None) or "invalid"}


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
        if exc.field is None:
            set_rollback()
            return Response(error_body(exc.code, _one_line(exc.message)), status=exc.status)
        # About one input: answered as that field's error, like a serializer's.
        exc = exceptions.ValidationError({exc.field: [exc.message]})

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
        if _codes(detail) == {"unique"}:
            # Well-formed input that names what another object already is (a slug):
            # the state conflicts, the input is not invalid.
            return Response(
                error_body("already_exists", _one_line(first), detail),
                status=409,
                headers=headers,
            )
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


class InvalidCursor(exceptions.APIException):
    status_code = 400
    default_detail = "Invalid cursor."
    default_code = "invalid_cursor"


class CursorPagination(pagination.CursorPagination):
    """DRF's cursor pagination, refusing (400 ``invalid_cursor``) a cursor it did not
    make: one that does not decode, or whose position is not a value of the ordering
    field. DRF filters on whatever position a cursor carries, so ``p=abc`` on a date
    ordering reached the database and answered 500."""

    invalid_cursor_message = InvalidCursor.default_detail

    def paginate_queryset(self, queryset, request, view=None):
        self._model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request):
        try:
            cursor = super().decode_cursor(request)
        except exceptions.NotFound:
            raise InvalidCursor from None
        if cursor is not None and cursor.position is not None:
            self._check_position(cursor.position)
        return cursor

    def _check_position(self, position: str) -> None:
        """Positions stay the strings DRF compares; only their validity is checked."""
        if CONTROL_CHARACTERS.search(position):
            raise InvalidCursor
        field = self._model._meta.get_field(self.ordering[0].lstrip("-"))
        try:
            value = field.to_python(position)
            field.run_validators(value)
        except DjangoValidationError:
            raise InvalidCursor from None
        if isinstance(value, datetime):
            # DRF writes aware datetimes; a naive one, or one past year 9999 in UTC,
            # cannot be compared with the column.
            if value.tzinfo is None:
                raise InvalidCursor
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise InvalidCursor from None


def cursor_pagination(ordering: str | tuple[str, ...]) -> type[CursorPagination]:
    """A CursorPagination ordered by ``ordering`` (DRF's default, ``-created``,
    names a field our models do not have)."""
    return type(
        "CursorPagination",
        (CursorPagination,),
        {"ordering": ordering, "__module__": __name__},
    )


class StrictCharField(serializers.CharField):
    """Text that must arrive as a JSON string. DRF's CharField turns a number into text
    (``{"reason": 0}`` stored "0"); the schema says string, so a number is refused."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictSlugField(StrictCharField, serializers.SlugField):
    pass


class RefuseUnknownFields:
    """A request body's field that the serializer does not know is refused (400
    ``invalid``, naming it) rather than ignored: a mistyped optional field
    (``grace_hour``) would otherwise be dropped and its default applied unnoticed.
    The schema says so (``additionalProperties: false``, stagegate.schema)."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(str(name) for name in data if name not in writable)
            if unknown:
                raise serializers.ValidationError(
                    {name: ["Unknown field."] for name in unknown}, code="unknown_field"
                )
        return super().to_internal_value(data)


class Serializer(RefuseUnknownFields, serializers.Serializer):
    """The base of every request body serializer."""


class ModelSerializer(RefuseUnknownFields, serializers.ModelSerializer):
    """DRF's ModelSerializer refusing unknown fields, its text fields ``StrictCharField``s."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
    }


def _error_response(code: str, message: str, status: int, details: Any = None) -> JsonResponse:
    return JsonResponse(error_body(code, message, details), status=status)


OPENAI_PREFIX = "/v1/"


def _openai_not_found(path: str) -> HttpResponse:
    body = {
        "error": {
            "message": "No such route or object.",
            "type": "not_found_error",
            "param": None,
            "code": "not_found",
        }
    }
    return HttpResponse(json.dumps(body), status=404, content_type="application/json")


class ApiEdgeMiddleware:
    """What reaches ``/api/`` without passing through a DRF view gets the error shape too.

    - A path or query parameter with a control character is refused before any view
      runs: 404 ``not_found`` for a path (no id has one), 400 ``invalid`` naming each
      such parameter. One place for every filter and id, present and future. A path
      with one is a 404 on every other route too (the console's, the admin's): PostgreSQL
      cannot even look such a name up.
    - A 404 that Django answered itself (no URL matched, e.g. an id with a dot) is
      answered in the error shape instead of an HTML page. Redirects that add a
      missing trailing slash are left alone.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        if CONTROL_CHARACTERS.search(request.path):  # no route of any app has one
            if request.path.startswith(API_PREFIX):
                return _error_response("not_found", str(exceptions.NotFound.default_detail), 404)
            if request.path.startswith(OPENAI_PREFIX):
                return _openai_not_found(request.path)
            return HttpResponseNotFound("Not found.", content_type="text/plain")
        if request.path.startswith(OPENAI_PREFIX):
            # OpenAI's files and fine-tuning routes (tuning.views): their own error shape.
            response = self.get_response(request)
            if response.status_code == 404 and not response.get("Content-Type", "").startswith(
                "application/json"
            ):
                return _openai_not_found(request.path)
            return response
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        refused = sorted(
            name
            for name, values in request.GET.lists()
            if CONTROL_CHARACTERS.search(name)
            or any(CONTROL_CHARACTERS.search(value) for value in values)
        )
        if refused:
            details = {name: [CONTROL_CHARACTERS_REFUSED] for name in refused}
            message = f"invalid input: {ascii(refused[0])[1:-1]}: {CONTROL_CHARACTERS_REFUSED}"
            return _error_response("invalid", message, 400, details)
        response = self.get_response(request)
        if response.status_code == 404 and not response.get("Content-Type", "").startswith(
            "application/json"
        ):
            return _error_response("not_found", str(exceptions.NotFound.default_detail), 404)
        return response


def choice_filter(choices, **kwargs) -> serializers.ChoiceField:
    """A query filter taking one of ``choices``; a bad value is a 400 naming them all."""
    allowed = ", ".join(str(choice) for choice in serializers.ChoiceField(choices).choices)
    message = f'"{{input}}" is not a valid choice; choose one of: {allowed}.'
    return serializers.ChoiceField(
        choices=choices,
        required=False,
        allow_blank=True,
        error_messages={"invalid_choice": message},
        **kwargs,
    )


def query_filters(request, serializer_class: type[serializers.Serializer]) -> dict:
    """The request's query filters validated by ``serializer_class`` (400 ``invalid``
    with details per parameter), without the ones not given."""
    serializer = serializer_class(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    return {name: value for name, value in serializer.validated_data.items() if value}


@extend_schema_field(
    {
        "oneOf": [
            {"type": "object", "description": "Messages per field or parameter (`invalid`)."},
            {"type": "array", "description": "Every problem of a plan (`plan_invalid`)."},
        ]
    }
)
class _ErrorDetailsField(serializers.JSONField):
    pass


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = _ErrorDetailsField(required=False)


class ErrorSerializer(serializers.Serializer):
    """The body of every error response (for the OpenAPI schema)."""

    error = ErrorDetailSerializer()
