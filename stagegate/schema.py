"""The OpenAPI schema (drf-spectacular) says what the API answers: every error status
an operation can give, the session cookie as the security scheme.

Loaded through ``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]`` when a schema is generated,
which also registers the authentication extension below.
"""

from __future__ import annotations

from drf_spectacular import openapi
from drf_spectacular.authentication import SessionScheme as _SpectacularSessionScheme
from drf_spectacular.utils import OpenApiResponse

from stagegate.api import ErrorSerializer

# Every /api/ operation needs a signed-in user; every one reads query parameters that
# ApiEdgeMiddleware may refuse; ids in paths name objects that may be missing or not
# the caller's.
_ERROR_STATUSES = {
    "400": "Invalid input: `invalid` with `details` per field or parameter, "
    "`invalid_cursor`, `parse_error`.",
    "401": "Not signed in (`not_authenticated`); `WWW-Authenticate` names the scheme.",
    "403": "Signed in without the role this needs, or a write without its CSRF token "
    "(`permission_denied`).",
    "404": "Not found, or not yours to see (`not_found`).",
}


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema, with the error statuses every operation can answer
    (``_ERROR_STATUSES``) added where the view did not document them itself."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code, description in _ERROR_STATUSES.items():
            if code == "404" and "{" not in self.path:
                continue
            if code not in responses:
                error = OpenApiResponse(ErrorSerializer, description=description)
                responses[code] = self._get_response_for_code(error, code, direction=direction)
        return responses


class SessionScheme(_SpectacularSessionScheme):
    """The security scheme of ``access.authentication.SessionAuthentication``: the
    session cookie, as for DRF's own session authentication."""

    target_class = "access.authentication.SessionAuthentication"
