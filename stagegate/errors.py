"""The one exception services raise when the state of things does not allow an action.

Views do not translate it: the API's exception handler (``stagegate.api``) answers it
in the common error shape with its stable code and status.
"""

from __future__ import annotations


class Refused(Exception):
    """An action refused: a stable snake_case ``code``, a one-line message, an HTTP status
    (409 when the object's state forbids it, 403 when this user may not).

    ``field`` names the one input the refusal is about, when there is one (a username
    no one may add): the API then answers it as that field's error, 400 ``invalid``
    with ``details``, as it answers the serializers' own, and a console form shows it
    beside the field."""

    def __init__(
        self, code: str, message: str, *, status: int = 409, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field
