"""The typed environment readers refuse bad values at start-up, naming the variable."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from stagegate.env import env_float, env_int


@pytest.mark.parametrize(
    ("reader", "raw", "expected"),
    [(env_int, "7", 7), (env_int, "", 3), (env_float, "0.25", 0.25), (env_float, "2", 2.0)],
)
def test_env_number_reads_value_or_default(monkeypatch, reader, raw, expected):
    monkeypatch.setenv("STAGEGATE_TEST_NUMBER", raw)
    assert reader("STAGEGATE_TEST_NUMBER", 3, minimum=0) == expected


@pytest.mark.parametrize(
    ("reader", "raw", "message"),
    [
        (env_int, "1.5", "'1.5' is not an integer"),
        (env_float, "soon", "'soon' is not a number"),
        (env_float, "nan", "'nan' is not a finite number"),
        (env_float, "inf", "'inf' is not a finite number"),
        (env_int, "-1", "-1 is below the minimum of 0"),
        (env_float, "-0.5", "-0.5 is below the minimum of 0"),
    ],
)
def test_env_number_refuses_bad_values_naming_the_variable(monkeypatch, reader, raw, message):
    monkeypatch.setenv("STAGEGATE_TEST_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured) as refused:
        reader("STAGEGATE_TEST_NUMBER", 3, minimum=0)
    assert str(refused.value) == f"STAGEGATE_TEST_NUMBER={message}"
