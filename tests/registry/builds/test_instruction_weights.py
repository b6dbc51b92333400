"""Merge weights from cosine similarities: temperature, floor, order and edge cases."""

from __future__ import annotations

import math

import pytest

from registry.builds.instruction_weights import instruction_weights


def test_a_cosine_gap_of_one_temperature_is_a_factor_e() -> None:
    weights = instruction_weights([0.60, 0.55], temperature=0.05)
    assert weights[0] / weights[1] == pytest.approx(math.e)
    assert sum(weights) == pytest.approx(1.0)


def test_bricks_far_below_the_best_are_dropped_and_the_rest_renormalised() -> None:
    # 0.30 trails by 0.3 (weight ratio e^-6 < 0.1): dropped; 0.52 trails by 0.08 (e^-1.6 = 0.20): kept.
    weights = instruction_weights([0.30, 0.60, 0.52], temperature=0.05, floor=0.1)
    assert weights[0] == 0.0
    assert weights[1] == pytest.approx(1 / (1 + math.exp(-1.6)))
    assert weights[2] == pytest.approx(math.exp(-1.6) / (1 + math.exp(-1.6)))


def test_equal_similarities_share_equally_and_the_scale_of_the_cosines_does_not_matter() -> None:
    assert instruction_weights([0.4] * 4) == pytest.approx([0.25] * 4)
    assert instruction_weights([0.9, 0.85]) == pytest.approx(instruction_weights([0.3, 0.25]))


def test_the_defaults_keep_two_bricks_0_12_apart_with_a_real_share_and_drop_one_0_2_behind() -> None:
    kept = instruction_weights([0.75, 0.87])
    assert kept[0] == pytest.approx(1 / (1 + math.exp(1.2))) and kept[0] > 0.2
    assert instruction_weights([0.87, 0.67]) == [1.0, 0.0]


def test_one_brick_gets_everything_and_none_gets_nothing() -> None:
    assert instruction_weights([-0.2]) == [1.0]
    assert instruction_weights([]) == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        instruction_weights([0.5], temperature=0)
    with pytest.raises(ValueError):
        instruction_weights([0.5], floor=1.0)
