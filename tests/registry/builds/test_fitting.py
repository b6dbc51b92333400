"""The recipe's ``fit`` section: new recipes name the optimiser and its settings, and a recipe
written before a field existed is fitted as it was then (Adam before ``method``, every brick
before ``narrow_to``), so it builds the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.builds.fitting import LEARNING_RATE, METHOD, NARROW_TO, SPREAD, TOLERANCE, fit_recipe, fit_section
from registry.inputs import FitRequest, IOPair

EXAMPLES = [("the battery lasts", "positive"), ("broke after a day", "negative")]


def _recipe(section: dict) -> dict:  # type: ignore[type-arg]
    return {"bricks": [{"name": name, "weight": 1 / 3} for name in "abc"], "fit": section}


def test_new_sections_name_the_method_and_its_settings() -> None:
    section = fit_section(FitRequest(examples=[IOPair(input=i, output=o) for i, o in EXAMPLES], steps=5))
    settings = (section["method"], section["tolerance"], section["spread"], section["narrow_to"])
    assert settings == ("gauss-newton-exact", 0.01, 0, 2)
    assert settings == (METHOD, TOLERANCE, SPREAD, NARROW_TO)


# A recipe written with the Broyden-updated Gauss-Newton fit recorded its settings (spread 4).
OLD_SETTINGS = {"gauss-newton": {"method": "gauss-newton", "tolerance": 0.01, "spread": 4}}
# The fields each kind of older recipe lacks.
MISSING = {
    "adam": ("method", "tolerance", "spread", "narrow_to"),
    "gauss-newton": ("narrow_to",),
    "all": ("narrow_to",),
}


# What each kind of recipe is fitted with: its own settings, or those of its time.
EXPECTED = {
    "adam": {"method": "adam", "spread": 0, "narrow_to": None},
    "gauss-newton": {"method": "gauss-newton", "spread": 4, "narrow_to": None},
    "all": {"method": "gauss-newton-exact", "spread": 0, "narrow_to": None},
    "gauss-newton-exact": {"method": "gauss-newton-exact", "spread": 0, "narrow_to": 2},
}


@pytest.mark.parametrize(
    "kind",
    ["adam", "gauss-newton", "all", "gauss-newton-exact"],
    ids=["before-the-field", "broyden", "exact-before-narrowing", "exact"],
)
def test_fit_recipe_uses_the_recipes_method(
    kind: str, llama_base: Path, loras: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import composer

    fit_weights = composer.fit_weights
    calls: list[dict] = []  # type: ignore[type-arg]

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return fit_weights(*args, **kwargs)

    monkeypatch.setattr(composer, "fit_weights", spy)
    bricks = [loras["r4"], loras["r8"], loras["rslora"]]
    section = fit_section(FitRequest(examples=[IOPair(input=i, output=o) for i, o in EXAMPLES], steps=4))
    for key in MISSING.get(kind, ()):
        del section[key]
    section.update(OLD_SETTINGS.get(kind, {}))
    built = fit_recipe(
        _recipe(section),
        llama_base,
        [(b / "adapter_config.json", b / "adapter_model.safetensors") for b in bricks],
        lambda _fraction, _message: None,
        scratch=tmp_path,
    )
    (call,) = calls
    assert {key: call[key] for key in EXPECTED[kind]} == EXPECTED[kind]
    direct = fit_weights(llama_base, bricks, EXAMPLES, steps=4, lr=LEARNING_RATE, init=[1 / 3] * 3, **EXPECTED[kind])
    assert built["fit"]["weights"] == pytest.approx(list(direct.weights), abs=1e-6)
