"""Did-you-mean hints (pure)."""

from __future__ import annotations

from registry.suggest import did_you_mean


def test_close_names_are_suggested_and_far_ones_are_not() -> None:
    assert did_you_mean("sumarize", ["summarize", "sentiment"]) == " (did you mean 'summarize'?)"
    assert did_you_mean("nope", ["summarize", "sentiment"]) == ""
    assert did_you_mean("tis", ["ties", "dare_ties", "linear"]).startswith(" (did you mean 'ties'")
    assert did_you_mean("x", []) == ""
