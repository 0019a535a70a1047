"""Confidence bounds on proportions, shared by the stage reviews (``rollout.criteria``),
the plan schema (an assessment set too small to ever pass is refused) and the
fine-tuning assessment (``tuning.assessment``). Pure Python.

Both bounds are the ends of the Wilson score interval, which stays inside [0, 1] and
behaves at 0 and n events, where the normal approximation does not.
"""

from __future__ import annotations

import math
from statistics import NormalDist

Z_95 = 1.959963984540054  # the two-sided 95% normal quantile


def z_for(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (0.95 -> 1.96)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _check(events: int, trials: int, z: float) -> None:
    if not 0 <= events <= trials:
        raise ValueError(f"need 0 <= events <= trials, got events={events}, trials={trials}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite number, got {z}")


def _spread(events: int, trials: int, z: float) -> tuple[float, float]:
    """The Wilson interval's centre and half-width."""
    n = trials
    point = events / n
    spread = z * z / n
    centre = (point + spread / 2) / (1 + spread)
    half = z * math.sqrt(point * (1 - point) / n + spread / (4 * n)) / (1 + spread)
    return centre, half


def wilson_upper_bound(events: int, trials: int, z: float = Z_95) -> float:
    """The upper end of the Wilson score interval for the proportion ``events / trials``.

    With ``trials == 0`` nothing is known, so the answer is the worst case, 1.0. The result
    always lies in ``[events / trials, 1.0]``. Raises ``ValueError`` unless
    ``0 <= events <= trials`` and ``z`` is a positive finite number.
    """
    _check(events, trials, z)
    if trials == 0 or events == trials:
        # Both are exactly 1.0 mathematically; the formula would only add rounding noise.
        return 1.0
    n = trials
    point = events / n
    spread = z * z / n
    bound = (point + spread / 2 + z * math.sqrt(point * (1 - point) / n + spread / (4 * n))) / (
        1 + spread
    )
    # Keep the documented range exact despite floating-point rounding near the ends.
    return min(1.0, max(point, bound))


def wilson_lower_bound(events: int, trials: int, z: float = Z_95) -> float:
    """The lower end of the Wilson score interval for ``events / trials``.

    With ``trials == 0`` nothing is known, so the answer is the worst case, 0.0. The result
    always lies in ``[0.0, events / trials]``. Raises ``ValueError`` as
    ``wilson_upper_bound`` does.
    """
    _check(events, trials, z)
    if trials == 0 or events == 0:
        return 0.0
    centre, half = _spread(events, trials, z)
    return max(0.0, min(events / trials, centre - half))
