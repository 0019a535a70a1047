"""How API callers authenticate: the Django session of a signed-in user (the admin's
login), with CSRF enforced on writes, as DRF's ``SessionAuthentication`` does.

DRF answers an unauthenticated request with 401 only when the first authentication
class names a scheme for ``WWW-Authenticate``, and 403 otherwise; session cookies have
no registered scheme, so this one names the ``Cookie`` scheme of
draft-broyer-http-cookie-auth: where to sign in, and which cookie carries the session.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import authentication


class SessionAuthentication(authentication.SessionAuthentication):
    def authenticate_header(self, request) -> str:
        return (
            f'Cookie realm="stagegate", form-action="{settings.LOGIN_URL}", '
            f'cookie-name="{settings.SESSION_COOKIE_NAME}"'
        )
