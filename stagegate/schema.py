"""The OpenAPI schema (drf-spectacular) says what the API answers: every error status
an operation can give, which parameter values ``stagegate.api.ApiEdgeMiddleware``
refuses, the session cookie as the security scheme.

Loaded through ``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]`` when a schema is generated,
which also registers the authentication extension below; ``refused_characters`` is a
``SPECTACULAR_SETTINGS`` postprocessing hook. The schema is checked against the
running API by schemathesis (tests/test_schemathesis.py).
"""

from __future__ import annotations

from drf_spectacular import openapi
from drf_spectacular.authentication import SessionScheme as _SpectacularSessionScheme
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from stagegate.api import CONTROL_CHARACTERS, ErrorSerializer, RefuseUnknownFields

# Every /api/ operation needs a signed-in user; every one reads query parameters that
# ApiEdgeMiddleware may refuse; ids in paths and bodies name objects that may be
# missing or not the caller's (and an unknown ?format= is a 404 too).
_ERROR_STATUSES = {
    "400": "Invalid input: `invalid` with `details` per field or parameter, "
    "`invalid_cursor`, `parse_error`.",
    "401": "Not signed in (`not_authenticated`); `WWW-Authenticate` names the scheme.",
    "403": "Signed in without the role this needs, or a write without its CSRF token "
    "(`permission_denied`).",
    "404": "Not found, or not yours to see (`not_found`).",
    "409": "The object's state forbids this, or the input names what another object "
    "already is (`already_exists`).",
}
_WRITES = ("POST", "PUT", "PATCH", "DELETE")


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema, with the error statuses every operation can answer
    (``_ERROR_STATUSES``; 409 on writes) added where the view did not document them
    itself; text that may not be blank saying so after trimming; request bodies
    closed to unknown fields where the serializer refuses them."""

    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        # DRF trims text before refusing it as blank, so "  " is blank too.
        if (
            direction == "request"
            and isinstance(field, serializers.CharField)
            and not field.allow_blank
            and field.trim_whitespace
            and not {"pattern", "enum", "format"} & set(schema)
        ):
            schema["pattern"] = r"\S"
        return schema

    def _map_basic_serializer(self, serializer, direction):
        schema = super()._map_basic_serializer(serializer, direction)
        if direction == "request" and isinstance(serializer, RefuseUnknownFields):
            schema["additionalProperties"] = False
        return schema

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code, description in _ERROR_STATUSES.items():
            if code == "409" and self.method not in _WRITES:
                continue
            if code not in responses:
                error = OpenApiResponse(ErrorSerializer, description=description)
                responses[code] = self._get_response_for_code(error, code, direction=direction)
        return responses


# The parameters ApiEdgeMiddleware accepts: no control characters (the same class as
# stagegate.api.CONTROL_CHARACTERS, which this is built from).
NO_CONTROL_CHARACTERS = f"^[^{CONTROL_CHARACTERS.pattern[1:-1]}]*$"


def refused_characters(result, generator, request, public):
    """Postprocessing hook: every string parameter in a path or query that has no
    pattern or enum of its own says that control characters are refused."""
    for path in result.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") not in ("path", "query") or schema.get("type") != "string":
                    continue
                if "pattern" not in schema and "enum" not in schema:
                    schema["pattern"] = NO_CONTROL_CHARACTERS
    return result


class SessionScheme(_SpectacularSessionScheme):
    """The security scheme of ``access.authentication.SessionAuthentication``: the
    session cookie, as for DRF's own session authentication."""

    target_class = "access.authentication.SessionAuthentication"
