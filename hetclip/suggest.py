"""Nearest-name suggestions for error messages ("did you mean ...?")."""
from __future__ import annotations

import difflib
from typing import Iterable


def nearest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice closest to ``word`` (difflib's ratio >= ``cutoff``), or None."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return near[0] if near else None


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the nearest choice, or ``""`` when none is close: append it to a message."""
    near = nearest(word, choices, cutoff)
    return f"; did you mean {near!r}?" if near else ""
