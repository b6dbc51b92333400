"""The recipe's ``fit`` section: new recipes name the optimiser, and a recipe written before
that field existed is fitted with Adam, as it was then, so it builds the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.builds.fitting import LEARNING_RATE, METHOD, SPREAD, TOLERANCE, fit_recipe, fit_section
from registry.inputs import FitRequest, IOPair

EXAMPLES = [("the battery lasts", "positive"), ("broke after a day", "negative")]


def _recipe(section: dict) -> dict:  # type: ignore[type-arg]
    return {"bricks": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}], "fit": section}


def test_new_sections_name_the_method_and_its_settings() -> None:
    section = fit_section(FitRequest(examples=[IOPair(input=i, output=o) for i, o in EXAMPLES], steps=5))
    assert (section["method"], section["tolerance"], section["spread"]) == ("gauss-newton", 0.01, 4)
    assert (METHOD, TOLERANCE, SPREAD) == ("gauss-newton", 0.01, 4)


@pytest.mark.parametrize("method", [None, "gauss-newton"], ids=["before-the-field", "gauss-newton"])
def test_fit_recipe_uses_the_recipes_method(
    method: str | None, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from composer import fit_weights

    bricks = [loras["r4"], loras["r8"]]
    section = fit_section(FitRequest(examples=[IOPair(input=i, output=o) for i, o in EXAMPLES], steps=4))
    if method is None:
        for key in ("method", "tolerance", "spread"):
            del section[key]
    built = fit_recipe(
        _recipe(section),
        llama_base,
        [(b / "adapter_config.json", b / "adapter_model.safetensors") for b in bricks],
        lambda _fraction, _message: None,
        scratch=tmp_path,
    )
    direct = {
        name: fit_weights(llama_base, bricks, EXAMPLES, steps=4, lr=LEARNING_RATE, init=[0.5, 0.5], method=name)
        for name in ("adam", "gauss-newton")
    }
    expected = direct[method or "adam"]
    assert built["fit"]["weights"] == pytest.approx(list(expected.weights), abs=1e-6)
    assert direct["adam"].weights != direct["gauss-newton"].weights
