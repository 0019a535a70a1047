"""Whether a model's answer is a refusal: the one definition the dataset screening (does
a training row teach the model to comply?) and the tuned model's assessment share.

An answer is a refusal when its finish_reason is ``content_filter`` (a provider's filter
stopped it) or when one of the plan's refusal markers (``Assessment.refusal_markers``;
``rollout.plan_schema.DEFAULT_REFUSAL_MARKERS`` by default) occurs in it, both compared
after NFKC and case folding (typographic apostrophes read as ASCII ones), so "I CAN\u2019T
HELP" and a full-width "\uff49 can't help" both read as "i can't help".
Pure Python (no Django).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from functools import lru_cache

# Typographic apostrophes are how many models write "can't"; NFKC keeps them as they are.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()


@lru_cache(maxsize=64)
def _folded_markers(markers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(folded for marker in markers if (folded := _fold(marker).strip()))


def is_refusal(text: str, markers: Sequence[str], finish_reason: str | None = None) -> bool:
    """True when ``finish_reason`` is ``content_filter`` or a marker of ``markers`` is a
    substring of ``text`` (both NFKC-normalized, apostrophes made ASCII, case-folded).
    A marker that folds to nothing (blank) matches nothing."""
    if finish_reason == "content_filter":
        return True
    folded_markers = _folded_markers(tuple(markers))
    if not folded_markers or not text:
        return False
    folded = _fold(text)
    return any(marker in folded for marker in folded_markers)
