"""Fixtures of the fine-tuning tests: the proxy's cast (tests/access/proxy_cast.py)."""

from tests.access.conftest import cast  # noqa: F401 - the same fixture, shared
