"""Low-rank algebra: truncating ``B @ A`` from its factors is the optimal truncation."""

from __future__ import annotations

import math

import pytest
import torch

from composer.lora import Factors, delta, stacked_factors
from composer.lowrank import truncate_product, truncated_svd


def _factors(out: int, inner: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inner, generator=generator), torch.randn(inner, width, generator=generator)


def _optimal(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Best rank-k approximation by a dense float64 SVD, and its relative error."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx, float(torch.linalg.vector_norm(s[rank:]) / torch.linalg.vector_norm(s))


@pytest.mark.parametrize(("out", "inner", "width", "rank"), [(64, 24, 48, 5), (40, 30, 70, 12), (6, 10, 20, 4)])
def test_truncating_factors_equals_the_svd_of_the_product(out: int, inner: int, width: int, rank: int) -> None:
    b, a = _factors(out, inner, width, seed=out)
    result = truncate_product(b, a, rank)
    expected, expected_error = _optimal(b @ a, rank)
    assert result.rank == min(rank, out, width)
    assert tuple(result.b.shape) == (out, result.rank) and tuple(result.a.shape) == (result.rank, width)
    product = result.b.double() @ result.a.double()
    assert torch.linalg.vector_norm(product - expected) <= 1e-5 * torch.linalg.vector_norm(expected)
    measured = float(torch.linalg.vector_norm((b @ a).double() - product) / torch.linalg.vector_norm((b @ a).double()))
    assert result.relative_error == pytest.approx(expected_error, rel=1e-6)
    assert result.relative_error == pytest.approx(measured, rel=1e-4)


def test_a_rank_at_least_the_inner_dimension_is_exact() -> None:
    b, a = _factors(20, 6, 30, seed=1)
    result = truncate_product(b, a, 6)
    assert result.relative_error == 0.0 and result.rank == 6
    assert torch.equal(result.b @ result.a, b @ a)


def test_truncated_svd_of_a_dense_matrix() -> None:
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(30, 50, generator=generator)
    result = truncated_svd(matrix, 7)
    expected, expected_error = _optimal(matrix, 7)
    torch.testing.assert_close(result.b.double() @ result.a.double(), expected, rtol=1e-4, atol=1e-4)
    assert result.relative_error == pytest.approx(expected_error, rel=1e-5)
    full = truncated_svd(matrix, 100)
    assert full.rank == 30 and full.relative_error < 1e-6


def test_stacked_factors_are_the_weighted_sum_of_deltas() -> None:
    generator = torch.Generator().manual_seed(3)
    parts = [
        Factors(torch.randn(r, 12, generator=generator), torch.randn(9, r, generator=generator), s, w)
        for r, s, w in ((2, 0.5, 1.0), (5, 2.0, -0.7), (3, 1.0 / 3**0.5, 0.2))
    ]
    b_cat, a_cat = stacked_factors(parts)
    assert tuple(b_cat.shape) == (9, 10) and tuple(a_cat.shape) == (10, 12)
    expected = sum(p.weight * p.scaling * (p.b.double() @ p.a.double()) for p in parts)
    torch.testing.assert_close(b_cat.double() @ a_cat.double(), expected, rtol=1e-6, atol=1e-6)  # type: ignore[arg-type]
    expected_delta = 2.0 * (parts[1].b.double() @ parts[1].a.double())
    torch.testing.assert_close(delta(parts[1]).double(), expected_delta, rtol=1e-5, atol=1e-5)


def test_rank_deficient_and_ill_conditioned_stacks_truncate_optimally() -> None:
    generator = torch.Generator().manual_seed(4)
    b, a = _factors(300, 6, 200, seed=5)
    other_b, other_a = _factors(300, 4, 200, seed=6)
    # The same brick twice (exactly dependent columns) plus a nearly parallel one.
    nearly = b[:, :1] + 1e-6 * torch.randn(300, 1, generator=generator)
    stacked_b = torch.cat([b, b, other_b, nearly], dim=1)
    stacked_a = torch.cat([a, -0.5 * a, other_a, torch.randn(1, 200, generator=generator)], dim=0)
    product = stacked_b.double() @ stacked_a.double()
    for rank in (1, 3, 8):
        result = truncate_product(stacked_b, stacked_a, rank)
        expected, expected_error = _optimal(product, rank)
        approx = result.b.double() @ result.a.double()
        assert result.relative_error == pytest.approx(expected_error, rel=1e-5, abs=1e-7)
        assert torch.linalg.vector_norm(approx - expected) <= 1e-5 * torch.linalg.vector_norm(expected)


def _kahan(n: int, c: float) -> torch.Tensor:
    """Kahan's upper-triangular matrix: pivots within a factor ``s^(n-1)`` of each other,
    condition number many orders of magnitude larger."""
    s = math.sqrt(1 - c * c)
    unit = torch.eye(n, dtype=torch.float64) - c * torch.triu(torch.ones(n, n, dtype=torch.float64), 1)
    return torch.diag(torch.tensor([s**i for i in range(n)], dtype=torch.float64)) @ unit


@pytest.mark.parametrize("case", ["graded-1e-2", "graded-1e-4", "graded-3e-6", "graded-1e-7", "kahan-0.5", "kahan-0.7"])
def test_ill_conditioned_stacks_truncate_optimally(case: str) -> None:
    # Stacks with condition numbers from 1e2 to 1e18, on both sides of the bound (1e5) where
    # B's Gram matrix switches from Cholesky to an eigendecomposition; Kahan's stacks fool
    # a pivot-ratio test (pivots within 1e-4 of each other at condition 1e12+).
    kind, value = case.split("-", 1)
    q, _ = torch.linalg.qr(torch.randn(400, 48, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    if kind == "graded":
        mix, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
        scales = torch.logspace(0, math.log10(float(value)), 48, dtype=torch.float64)
        stack = (q * scales) @ mix.T  # singular values `scales`, columns not orthogonal
    else:
        stack = q @ _kahan(48, float(value))
    b = stack.float()
    a = torch.randn(48, 300, generator=torch.Generator().manual_seed(10))
    product = b.double() @ a.double()
    for rank in (4, 16):
        result = truncate_product(b, a, rank)
        expected, expected_error = _optimal(product, rank)
        approx = result.b.double() @ result.a.double()
        assert result.relative_error == pytest.approx(expected_error, rel=1e-5, abs=1e-7)
        assert torch.linalg.vector_norm(approx - expected) <= 1e-5 * torch.linalg.vector_norm(expected)


def test_cancelling_factors_give_a_zero_adapter() -> None:
    b, a = _factors(50, 4, 30, seed=7)
    result = truncate_product(torch.cat([b, b], 1), torch.cat([a, -a], 0), 2)
    assert float((result.b @ result.a).abs().max()) < 1e-5
    assert result.relative_error == 0.0
