"""Did-you-mean hints for names a request got wrong (bricks, base models, merge methods,
method parameters), with `difflib`'s similarity ratio: pure, no I/O."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: str, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.6) -> str:
    """`` (did you mean 'summarize'?)`` for the closest candidates, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
