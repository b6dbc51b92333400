"""The boundary where composer errors become registry errors: the table, the context managers."""

from __future__ import annotations

import pytest

import composer
from registry import errors
from registry.composer_errors import COMPOSER_ERRORS, composer_errors, composer_problems, registry_error_for


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (composer.InvalidBaseModel, errors.InvalidBaseModel),
        (composer.InvalidAdapter, errors.InvalidAdapter),
        (composer.InvalidTensorFile, errors.InvalidAdapter),
        (composer.UnknownMethod, errors.InvalidRecipe),
        (composer.InvalidParams, errors.InvalidRecipe),
        (composer.IncompatibleBricks, errors.InvalidRecipe),
        (composer.NonFiniteResult, errors.InvalidRecipe),
        (composer.ComposeError, errors.InvalidRecipe),
    ],
)
def test_every_composer_error_maps_to_a_422_registry_error(
    raised: type[composer.ComposeError], expected: type[errors.BrickyardError]
) -> None:
    with pytest.raises(expected) as caught, composer_errors():
        raise raised("it went wrong", ["first problem", "second problem"])
    assert type(caught.value) is expected
    assert caught.value.status == 422
    assert caught.value.detail == "it went wrong"
    assert caught.value.errors == ["first problem", "second problem"]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_the_most_specific_class_wins() -> None:
    class Narrower(composer.InvalidAdapter):
        pass

    assert registry_error_for(Narrower("x")) is errors.InvalidAdapter
    assert all(getattr(composer, cls.__name__) is cls for cls in COMPOSER_ERRORS)  # public classes only


def test_into_overrides_the_table_and_field_locates_the_problems() -> None:
    with pytest.raises(errors.InvalidRecipe) as caught, composer_errors(into=errors.InvalidRecipe, field="params"):
        raise composer.InvalidAdapter("bad", ["density: too big", "params: must be an object"])
    assert caught.value.errors == ["params.density: too big", "params: must be an object"]


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(KeyError), composer_errors():
        raise KeyError("not a composer error")


def test_composer_problems_collects_instead_of_raising() -> None:
    problems: list[str] = ["earlier: problem"]
    reached = []
    with composer_problems(problems, "adapter_config"):
        reached.append("before")
        raise composer.InvalidAdapter("invalid adapter config", ["r: must be positive", "lora_alpha: missing"])
    assert reached == ["before"]
    assert problems == [
        "earlier: problem",
        "adapter_config: r: must be positive",
        "adapter_config: lora_alpha: missing",
    ]
    with composer_problems(problems, "adapter_config"):
        pass
    assert len(problems) == 3
