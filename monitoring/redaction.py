"""Keeping API keys out of what Stagegate stores and logs.

People paste keys into free text (a revocation reason that quotes the leaked key, a
key named after a key, an incident titled with one). Such text is kept, with every
key's secret redacted: ``sgk_<id>_<secret>`` becomes ``sgk_<id>_[redacted]``, so a
reader still knows which key was meant (the id is not secret, see ``access.keys``)
and the secret is nowhere. The operation itself always goes ahead.

Applied, each in one place:

- ``monitoring.audit.record``: every string of an audit row, before it is hashed;
- ``RedactedCharField`` / ``RedactedTextField``: the free-text columns of the models
  (names, reasons, comments, notes, titles), on every write, whichever path writes;
- ``RedactSecretsFilter``: every log record that reaches a handler (``LOGGING``).

A secret is 10 or more characters after ``sgk_<16-character id>_``, prefix and id in
any case (a key upper-cased by a tool still gives its secret away, its case being
cheap to guess against the checksum): ``stagegate.keyformat.KEY_HEAD``, the key's
shape defined once. Ten is the length of ``[redacted]``: redaction never lengthens
text, so a value that fits its column still fits. Fewer than ten characters of a
49-character secret give nothing away.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from django.db import models

from stagegate import keyformat

REDACTED = "[redacted]"
# The secret stops where another key begins, so two keys pasted together are both
# redacted.
SECRET_PATTERN = re.compile(
    rf"(?P<kept>{keyformat.KEY_HEAD})(?:(?!{keyformat.PREFIX})[0-9a-z]){{{len(REDACTED)},}}",
    re.IGNORECASE | re.ASCII,
)


def redact_secrets(text: str) -> str:
    """``text`` with the secret of every API key in it replaced by ``[redacted]``.

    Idempotent, and never longer than ``text``."""
    if "_" not in text:  # the usual case, and the fast one
        return text
    return SECRET_PATTERN.sub(rf"\g<kept>{REDACTED}", text)


def redact_json(value: Any) -> Any:
    """``redact_secrets`` over every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, dict):
        return {redact_json(key): redact_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(item) for item in value]
    return value


class _Redacted:
    """Redacts the value on every write: ``pre_save`` also corrects the instance, so
    what an API answers is what was stored; ``get_prep_value`` covers writes that do
    not go through an instance (``QuerySet.update``)."""

    def pre_save(self, model_instance, add):
        value = super().pre_save(model_instance, add)
        if isinstance(value, str):
            redacted = redact_secrets(value)
            if redacted != value:
                setattr(model_instance, self.attname, redacted)
            return redacted
        return value

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        return redact_secrets(value) if isinstance(value, str) else value

    def deconstruct(self):
        # The column is a plain one and redaction is Python's business: migrations see
        # the Django field, so adopting this class needs none.
        name, _path, args, kwargs = super().deconstruct()
        return name, f"django.db.models.{self._django_field}", args, kwargs


class RedactedCharField(_Redacted, models.CharField):
    """Free text kept on a model (a name, a reason, a title): never holds a key's secret."""

    _django_field = "CharField"


class RedactedTextField(_Redacted, models.TextField):
    """Long free text kept on a model (a note, a description): never holds a key's secret."""

    _django_field = "TextField"


class RedactSecretsFilter(logging.Filter):
    """Redacts every record passing the handler it is attached to: message, traceback
    (exception messages quote values) and stack. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave its report to the handler
            return True
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info)
        return True
