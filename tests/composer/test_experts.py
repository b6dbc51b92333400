"""PEFT ParamWrapper factor layout, checked against PEFT's own formula for the delta
(``einsum("o r e, e r i -> e o i")`` on the reshaped factors, ``peft/tuners/lora/layer.py``)."""

from __future__ import annotations

import pytest
import torch

from composer.experts import ExpertView, RawParameter, adapter_module_name, fused_factors

EXPERTS, RANK, OUT, IN = 3, 2, 6, 5


def _factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK * EXPERTS, IN, generator=generator), torch.randn(OUT, RANK * EXPERTS, generator=generator)


def _peft_delta(a: torch.Tensor, b: torch.Tensor, *, transposed: bool) -> torch.Tensor:
    weight_a = a.reshape(EXPERTS, -1, a.shape[-1])
    weight_b = b.reshape(b.shape[0], -1, EXPERTS)
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", weight_b, weight_a)


@pytest.mark.parametrize("transposed", [False, True])
def test_each_experts_slice_is_the_peft_delta_of_those_rows(transposed: bool) -> None:
    a, b = _factors()
    expected = _peft_delta(a, b, transposed=transposed)  # E x out x in (E x in x out when transposed)
    rows = expected.shape[1]
    for expert in range(EXPERTS):
        for start, stop in ((0, rows), (0, 2), (2, rows)):
            view = ExpertView(EXPERTS, expert, start, stop, transposed)
            a_part, b_part = view.factors(a, b)
            product = b_part @ a_part
            stored = product.T if transposed else product
            torch.testing.assert_close(stored, expected[expert, start:stop])


def test_fused_factors_invert_the_per_expert_views() -> None:
    a, b = _factors(1)
    parts = [ExpertView(EXPERTS, e, 0, OUT).factors(a, b) for e in range(EXPERTS)]
    fused_a, fused_b = fused_factors(parts)
    assert torch.equal(fused_a, a) and torch.equal(fused_b, b)


def test_a_concatenation_per_expert_sums_the_deltas() -> None:
    (a1, b1), (a2, b2) = _factors(2), _factors(3)
    parts = []
    for e in range(EXPERTS):
        (x1, y1), (x2, y2) = (ExpertView(EXPERTS, e, 0, OUT).factors(a, b) for a, b in ((a1, b1), (a2, b2)))
        parts.append((torch.cat([0.7 * x1, 0.3 * x2]), torch.cat([y1, y2], dim=1)))
    a, b = fused_factors(parts)
    assert a.shape == (2 * RANK * EXPERTS, IN) and b.shape == (OUT, 2 * RANK * EXPERTS)
    expected = 0.7 * _peft_delta(a1, b1, transposed=False) + 0.3 * _peft_delta(a2, b2, transposed=False)
    torch.testing.assert_close(_peft_delta(a, b, transposed=False), expected)


def test_wrappers_of_one_module_nest_in_parameter_order() -> None:
    gate_up = RawParameter("m.experts.gate_up_proj", "m.experts", "gate_up_proj", (4, 8, 4), False, 0)
    down = RawParameter("m.experts.down_proj", "m.experts", "down_proj", (4, 4, 4), False, 1)
    router = RawParameter("m.gate.weight", "m.gate", "weight", (4, 4), False, 0)
    every = [gate_up, down, router]
    assert adapter_module_name(gate_up, every) == "m.experts.base_layer"
    assert adapter_module_name(down, every) == "m.experts"
    assert adapter_module_name(router, every) == "m.gate"
    assert adapter_module_name(gate_up, [gate_up, router]) == "m.experts"
