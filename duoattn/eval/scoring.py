"""Scoring a generated answer against its references; every score is in [0, 1].

* ``string_match_all`` (RULER: niah, vt, cwe, fwe): the fraction of references contained in the answer,
  case-insensitively.
* ``string_match_part`` (RULER: qa): 1 if any reference is contained in the answer, case-insensitively.
* ``word_recall`` (needle in a haystack): the fraction of the distinct words of the reference that appear among
  the words of the answer (lower-cased, punctuation ignored), as in the DuoAttention needle plots.
* ``passkey``: 1 if the first number in the answer is the passkey.

RULER reports its string-match scores multiplied by 100 and cleans the prediction first (strip, control
characters to new lines); :func:`clean_prediction` does the same, which changes no string-match result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .passkey import score_passkey

_CONTROL = re.compile(r"[\x00-\x1f]")
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z0-9]+)*")


def clean_prediction(text: str) -> str:
    """RULER's post-processing: strip, and turn control characters into new lines."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = clean_prediction(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = clean_prediction(prediction).lower()
    return float(any(ref.lower() in pred for ref in references))


def words(text: str) -> set[str]:
    """Distinct lower-case words of ``text``, punctuation dropped (apostrophes inside words kept)."""
    return set(_WORD.findall(text.lower()))


def word_recall(prediction: str, references: Sequence[str]) -> float:
    """Fraction of the distinct words of ``references[0]`` found among the words of ``prediction``."""
    if len(references) != 1:
        raise ValueError(f"word_recall takes exactly one reference, got {len(references)}")
    wanted = words(references[0])
    if not wanted:
        raise ValueError(f"the reference {references[0]!r} has no words")
    return len(wanted & words(prediction)) / len(wanted)


def passkey(prediction: str, references: Sequence[str]) -> float:
    if len(references) != 1:
        raise ValueError(f"passkey takes exactly one reference, got {len(references)}")
    return score_passkey(references[0], prediction)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "word_recall": word_recall,
    "passkey": passkey,
}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prediction, references)
