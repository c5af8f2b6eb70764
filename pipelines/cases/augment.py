"""Training augmentation of a case that keeps image and text consistent: flips and laterality.

A CT crop on the preprocess grid is LPS-ordered (array axes z, y, x; x runs from the patient's right to their
left). Flipping z (head-foot) or y (front-back) shows an upside-down or back-to-front torso that evaluation
never shows, to a model with absolute position embeddings, so the recipes flip neither. Flipping x mirrors the
patient: the report's "right upper lobe" then lies on the image's left. With ``swap_laterality`` (the default
whenever x is flipped) every anatomy text, and the whole report, of a sample flipped in x has its laterality
words exchanged (:func:`swap_laterality`), so text and image agree again. The fvlm15 and ct-rate task labels
carry no side (a nodule of the right lung is a lung nodule), so labels need no change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["LATERAL_AXIS", "draw_flips", "swap_laterality"]

#: The array axis (z, y, x) that runs across the patient's right and left.
LATERAL_AXIS = 2

_PAIRS = {"right": "left", "left": "right", "rt": "lt", "lt": "rt", "dextro": "levo", "levo": "dextro"}
_WORD = re.compile(r"\b(" + "|".join(sorted(_PAIRS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _same_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_laterality(text: str) -> str:
    """``text`` with right <-> left exchanged, whole words, case kept ("Right" -> "Left", "rt" -> "lt",
    "dextro" <-> "levo" as a word); everything else unchanged."""
    return _WORD.sub(lambda m: _same_case(_PAIRS[m.group(1).lower()], m.group(1)), text)


def draw_flips(rng: np.random.Generator | None, axes: Sequence[int], prob: float) -> tuple[bool, bool, bool]:
    """Per axis 0, 1, 2: flip or not. One draw per axis of ``axes``, in that order, each True with ``prob``;
    never a flip without ``rng`` (evaluation) or with no axes."""
    if rng is None or not axes or prob <= 0:
        return (False, False, False)
    draws = {ax: bool(rng.random() < prob) for ax in axes}
    return tuple(draws.get(ax, False) for ax in range(3))  # type: ignore[return-value]
