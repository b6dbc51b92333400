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
    assert (section["method"], section["tolerance"], section["spread"]) == ("gauss-newton-exact", 0.01, 0)
    assert (METHOD, TOLERANCE, SPREAD) == ("gauss-newton-exact", 0.01, 0)


# A recipe written with the Broyden-updated Gauss-Newton fit recorded its settings (spread 4).
OLD_SETTINGS = {"gauss-newton": {"method": "gauss-newton", "tolerance": 0.01, "spread": 4}}


@pytest.mark.parametrize(
    "method", [None, "gauss-newton", "gauss-newton-exact"], ids=["before-the-field", "broyden", "exact"]
)
def test_fit_recipe_uses_the_recipes_method(
    method: str | None, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from composer import fit_weights

    bricks = [loras["r4"], loras["r8"]]
    section = fit_section(FitRequest(examples=[IOPair(input=i, output=o) for i, o in EXAMPLES], steps=4))
    if method is None:
        for key in ("method", "tolerance", "spread"):
            del section[key]
    section.update(OLD_SETTINGS.get(method or "", {}))
    built = fit_recipe(
        _recipe(section),
        llama_base,
        [(b / "adapter_config.json", b / "adapter_model.safetensors") for b in bricks],
        lambda _fraction, _message: None,
        scratch=tmp_path,
    )
    direct = {
        name: fit_weights(
            llama_base,
            bricks,
            EXAMPLES,
            steps=4,
            lr=LEARNING_RATE,
            init=[0.5, 0.5],
            method=name,  # type: ignore[arg-type]
            spread=OLD_SETTINGS.get(name, {}).get("spread", 0),
        )
        for name in ("adam", "gauss-newton", "gauss-newton-exact")
    }
    expected = direct[method or "adam"]
    assert built["fit"]["weights"] == pytest.approx(list(expected.weights), abs=1e-6)
    assert len({direct[name].weights for name in direct}) == 3
