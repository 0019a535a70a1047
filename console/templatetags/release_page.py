"""Filters of the release and plan pages."""

from __future__ import annotations

from django import template

from console.releases import percent

register = template.Library()


@register.filter(name="percent")
def percent_filter(rate) -> str:
    """A rate (0.02) as people write it (2%); anything not a number as it is."""
    try:
        return percent(float(rate))
    except (TypeError, ValueError):
        return "" if rate is None else str(rate)
