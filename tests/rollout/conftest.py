"""The atlas-mini cast's fixtures (tests/rollout/mini_cast.py) for every rollout test."""

from tests.rollout.mini_cast import mini, rex, ruth  # noqa: F401  (fixtures)
