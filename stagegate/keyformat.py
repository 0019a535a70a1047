"""The shape of a Stagegate API key, defined once: ``sgk_<key id>_<secret><checksum>``.

Plain constants, importing nothing (no Django, no app), so that every module that
makes or recognises a key reads them from here without an import cycle:
``access.keys`` generates and parses keys, ``access.models`` shows a key's prefix,
``monitoring.redaction`` finds keys' secrets in free text, and the console's access
explainer reads a key id typed by a person. What each part is for is said in
``access.keys``.
"""

from __future__ import annotations

PREFIX = "sgk_"
# The key id: not secret, stored in clear, the lookup handle. Crockford base32 in
# lower case (no i, l, o, u), as public ids are (``stagegate.ids``).
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ID_LENGTH = 16
# The secret and the checksum after it: base62.
SECRET_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_LENGTH = 43
CHECKSUM_LENGTH = 6

# How a key begins in free text (``sgk_<id>_``), loosely: any letter or digit in the
# id, for use with ``re.IGNORECASE``, so that a key mistyped or upper-cased by a tool
# is still recognised as one. What follows it is (part of) the secret.
KEY_HEAD = rf"{PREFIX}[0-9a-z]{{{ID_LENGTH}}}_"
