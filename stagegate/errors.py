"""The one exception services raise when the state of things does not allow an action.

Views do not translate it: the API's exception handler (``stagegate.api``) answers it
in the common error shape with its stable code and status.
"""

from __future__ import annotations


class Refused(Exception):
    """An action refused: a stable snake_case ``code``, a one-line message, an HTTP status
    (409 when the object's state forbids it, 403 when this user may not)."""

    def __init__(self, code: str, message: str, *, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
