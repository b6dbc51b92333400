"""Merge methods: the registry (names, params models, schemas) and the pure tensor math,
checked against PEFT's ``merge_utils`` and against the papers' definitions."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from peft.utils import merge_utils

from composer import MERGE_METHODS, InvalidParams, UnknownMethod, get_method, list_methods
from composer.methods import MergeContext, ops
from composer.methods.dare import DareLinearParams, DareTiesParams, merge_dare_linear, merge_dare_ties
from composer.methods.linear import LinearParams, merge_linear
from composer.methods.magnitude_prune import MagnitudePruneParams, merge_magnitude_prune
from composer.methods.ties import TiesParams, merge_ties

EXPECTED = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


def _deltas(n: int = 3, shape: tuple[int, int] = (24, 40), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def test_registry_lists_every_method_with_a_strict_params_schema() -> None:
    infos = list_methods()
    assert {info.name for info in infos} == EXPECTED == set(MERGE_METHODS)
    for info in infos:
        name, description, schema = info  # a plain (name, description, schema) tuple too
        assert name in EXPECTED
        assert description and "\n" not in description
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        for field in schema.get("properties", {}).values():
            assert "default" in field and field.get("description")
    assert set(infos[1].params_schema["properties"]) == {"density", "majority_sign_method"}
    assert set(MERGE_METHODS["dare_ties"].params_schema()["properties"]) == {"density", "majority_sign_method", "seed"}


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(UnknownMethod) as caught:
        get_method("slerp")
    assert "slerp" in str(caught.value)
    assert all(name in caught.value.problems[0] for name in EXPECTED)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": float("nan")}, "density"),
        ("ties", {"density": "0.5"}, "density"),
        ("ties", {"majority_sign_method": "median"}, "majority_sign_method"),
        ("dare_linear", {"seed": -1}, "seed"),
        ("dare_linear", {"seed": 1.5}, "seed"),
        ("dare_ties", {"seed": True}, "seed"),
        ("magnitude_prune", {"densty": 0.5}, "densty"),
        ("linear", {"density": 0.5}, "density"),
    ],
)
def test_invalid_params_are_refused_naming_the_field(method: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        get_method(method).validate_params(params)
    assert any(problem.startswith(f"{field}:") for problem in caught.value.problems), caught.value.problems


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(InvalidParams) as caught:
        get_method("dare_ties").validate_params({"density": 2, "majority_sign_method": "x", "seed": -3, "extra": 1})
    assert len(caught.value.problems) == 4


def test_defaults_and_valid_edges() -> None:
    assert get_method("ties").validate_params(None) == TiesParams(density=0.5, majority_sign_method="total")
    assert get_method("dare_linear").validate_params({"density": 1, "seed": 2**63 - 1}).density == 1.0


def test_importing_the_package_and_listing_methods_does_not_import_torch() -> None:
    code = (
        "import sys, composer, composer.methods, composer.cli\n"
        "composer.list_methods(); composer.get_method('ties').validate_params({'density': 0.2})\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'safetensors.torch') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == ""


# -- pure math against PEFT's merge_utils ---------------------------------------------------

WEIGHTS = [0.7, -0.3, 1.2]


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_equals_peft(sign: str, density: float) -> None:
    deltas = _deltas()
    expected = merge_utils.ties([d.clone() for d in deltas], torch.tensor(WEIGHTS), density, sign)
    actual = merge_ties(deltas, WEIGHTS, TiesParams(density=density, majority_sign_method=sign), _ctx(3))
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_magnitude_prune_equals_peft(density: float) -> None:
    deltas = _deltas(seed=1)
    expected = merge_utils.magnitude_prune([d.clone() for d in deltas], torch.tensor(WEIGHTS), density)
    actual = merge_magnitude_prune(deltas, WEIGHTS, MagnitudePruneParams(density=density), _ctx(3))
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_linear_is_the_weighted_sum() -> None:
    deltas = _deltas(seed=2)
    expected = merge_utils.task_arithmetic([d.clone() for d in deltas], torch.tensor(WEIGHTS))
    torch.testing.assert_close(merge_linear(deltas, WEIGHTS, LinearParams(), _ctx(3)), expected)


def _ctx(n: int, module: str = "m") -> MergeContext:
    return MergeContext(module=module, brick_keys=tuple(f"brick-{i}" for i in range(n)))


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_given_the_same_random_stream(density: float) -> None:
    # PEFT draws torch.bernoulli masks from the global generator; the composer draws the same
    # decisions from a generator seeded by (seed, module, brick key).
    (delta,) = _deltas(n=1, seed=3)
    module, seed, weight = "model.layers.0.mlp.up_proj", 1234, [0.6]
    context = MergeContext(module, ("k",))
    torch.manual_seed(ops.mask_seed(seed, module, "k"))
    expected_linear = merge_utils.dare_linear([delta.clone()], torch.tensor(weight), density)
    torch.manual_seed(ops.mask_seed(seed, module, "k"))
    expected_ties = merge_utils.dare_ties([delta.clone()], torch.tensor(weight), density, "total")
    actual_linear = merge_dare_linear([delta], weight, DareLinearParams(density=density, seed=seed), context)
    actual_ties = merge_dare_ties([delta], weight, DareTiesParams(density=density, seed=seed), context)
    torch.testing.assert_close(actual_linear, expected_linear, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual_ties, expected_ties, rtol=1e-6, atol=1e-6)


def _reference_dare(
    deltas: list[torch.Tensor], weights: list[float], density: float, seed: int, context: MergeContext, *, ties: bool
) -> torch.Tensor:
    """DARE (and DARE-TIES with the 'total' sign rule) written from the papers' definitions."""
    dropped = []
    for delta, key in zip(deltas, context.brick_keys, strict=True):
        generator = torch.Generator().manual_seed(ops.mask_seed(seed, context.module, key))
        mask = torch.bernoulli(torch.full(delta.shape, density), generator=generator)
        dropped.append(delta * mask / density)
    if not ties:
        return sum(w * x for w, x in zip(weights, dropped, strict=True))  # type: ignore[return-value]
    elected = torch.where(sum(dropped) >= 0, 1.0, -1.0)  # type: ignore[arg-type]
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for w, x in zip(weights, dropped, strict=True):
        agrees = (torch.sign(x) == elected).float()
        total += w * x * agrees
        count += agrees
    return total / count.clamp(min=1)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_matches_the_papers_definition(density: float) -> None:
    deltas, seed = _deltas(seed=9), 99
    context = _ctx(3, "model.layers.1.self_attn.v_proj")
    linear = merge_dare_linear(deltas, WEIGHTS, DareLinearParams(density=density, seed=seed), context)
    ties = merge_dare_ties(deltas, WEIGHTS, DareTiesParams(density=density, seed=seed), context)
    torch.testing.assert_close(linear, _reference_dare(deltas, WEIGHTS, density, seed, context, ties=False))
    torch.testing.assert_close(ties, _reference_dare(deltas, WEIGHTS, density, seed, context, ties=True))


def test_dare_is_deterministic_per_seed_module_and_brick_but_not_per_order() -> None:
    deltas = _deltas(seed=4)
    params = DareLinearParams(density=0.4, seed=7)
    context = _ctx(3, "a.q_proj")
    first = merge_dare_linear(deltas, WEIGHTS, params, context)
    assert torch.equal(first, merge_dare_linear(deltas, WEIGHTS, params, context))
    assert not torch.equal(first, merge_dare_linear(deltas, WEIGHTS, DareLinearParams(density=0.4, seed=8), context))
    assert not torch.equal(first, merge_dare_linear(deltas, WEIGHTS, params, _ctx(3, "a.k_proj")))
    reordered = merge_dare_linear(
        deltas[::-1], WEIGHTS[::-1], params, MergeContext("a.q_proj", context.brick_keys[::-1])
    )
    torch.testing.assert_close(reordered, first)


def test_dare_drops_and_rescales_each_entry() -> None:
    (delta,) = _deltas(n=1, shape=(200, 300), seed=5)
    density = 0.3
    kept = ops.random_keep(delta, density, torch.Generator().manual_seed(0))
    survivors = kept != 0
    torch.testing.assert_close(kept[survivors], delta[survivors] / density)
    fraction = float(survivors.float().mean())
    assert abs(fraction - density) < 4 * math.sqrt(density * (1 - density) / delta.numel())


def test_dare_linear_is_unbiased_on_average() -> None:
    deltas = _deltas(n=2, shape=(6, 8), seed=6)
    weights, density, draws = [0.8, -0.5], 0.25, 1500
    exact = merge_linear(deltas, weights, LinearParams(), _ctx(2))
    total = torch.zeros_like(exact)
    for seed in range(draws):
        total += merge_dare_linear(deltas, weights, DareLinearParams(density=density, seed=seed), _ctx(2))
    mean = total / draws
    # Per-entry standard error of the mean of sum_i w_i * m_i * d_i / p, m_i ~ Bernoulli(p).
    variance = sum((w * d) ** 2 for w, d in zip(weights, deltas, strict=True)) * (1 - density) / density
    standard_error = (variance / draws).sqrt()
    assert torch.all((mean - exact).abs() <= 5 * standard_error + 1e-6)
    single = merge_dare_linear(deltas, weights, DareLinearParams(density=density, seed=0), _ctx(2))
    assert (single - exact).abs().max() > 0.1  # one draw really is random


def test_trim_keeps_exactly_k_largest_even_with_ties() -> None:
    values = torch.tensor([[3.0, -3.0, 1.0, 3.0], [0.5, -2.0, 3.0, 0.0]])
    trimmed = ops.trim_to_density(values, 0.5)  # k = 4 of 8; five entries have |x| = 3
    assert int((trimmed != 0).sum()) == 4
    assert set(trimmed[trimmed != 0].abs().tolist()) == {3.0}
    assert torch.equal(ops.trim_to_density(values, 1.0), values)
    assert int((ops.trim_to_density(values, 0.1) != 0).sum()) == 0  # int(0.8) == 0, as in PEFT


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_opposite_weights_on_the_same_brick_cancel(name: str) -> None:
    (delta,) = _deltas(n=1, seed=7)
    method = get_method(name)
    same_brick = MergeContext("m", ("k", "k"))
    merged = method.combine([delta, delta.clone()], [1.0, -1.0], method.validate_params({}), same_brick)
    assert float(merged.abs().max()) < 1e-6


@pytest.mark.parametrize("name", ["linear", "ties", "magnitude_prune"])
def test_one_brick_at_weight_one_is_that_brick(name: str) -> None:
    (delta,) = _deltas(n=1, seed=8)
    method = get_method(name)
    params = method.validate_params({"density": 1.0} if name != "linear" else {})
    torch.testing.assert_close(method.combine([delta], [1.0], params, _ctx(1)), delta)
