"""Exact low-rank algebra: truncate a product ``B @ A`` without forming it, and the
truncated SVD of a dense matrix.

``truncate_product`` takes QR decompositions of ``B`` (``out x R``) and ``A^T`` (``in x R``)
and an SVD of the small ``R x R`` core ``R_B @ R_A^T``: the result is the best rank-``k``
approximation of ``B @ A`` in Frobenius norm (Eckart-Young), at ``O((out + in) R^2)`` cost
instead of the ``O(out * in * min(out, in))`` of an SVD of the dense product. Relative errors
are exact, computed from the discarded singular values. Pure functions: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LowRank", "truncate_product", "truncated_svd"]


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` with ``B`` ``out x k`` and ``A`` ``k x in`` (float32), and the relative
    Frobenius error ``||M - B @ A|| / ||M||`` against the matrix ``M`` it approximates."""

    b: Tensor
    a: Tensor
    relative_error: float

    @property
    def rank(self) -> int:
        """The number of factor columns ``k``."""
        return int(self.a.shape[0])


def _relative_error(singular_values: Tensor, rank: int) -> float:
    total = float(torch.linalg.vector_norm(singular_values))
    if total == 0.0 or not math.isfinite(total):
        return 0.0 if total == 0.0 else math.nan
    return float(torch.linalg.vector_norm(singular_values[rank:])) / total


def truncate_product(b: Tensor, a: Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of ``b @ a`` from the factors alone.

    When ``rank`` is at least the inner dimension the factors are returned unchanged (exact,
    error 0). Computed in float64, returned in float32.

    Args:
        b: ``out x R``.
        a: ``R x in``.
        rank: the target rank ``k >= 1``.

    Returns:
        `LowRank` with ``min(k, R, out, in)`` columns; the singular values are folded into ``b``.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if rank >= a.shape[0]:
        return LowRank(b=b.to(torch.float32), a=a.to(torch.float32), relative_error=0.0)
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.shape[0])
    new_b = q_b @ (u[:, :k] * s[:k])
    new_a = vh[:k] @ q_a.T
    return LowRank(b=new_b.to(torch.float32), a=new_a.to(torch.float32), relative_error=_relative_error(s, k))


def truncated_svd(matrix: Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of a dense matrix by its (reduced) SVD.

    Args:
        matrix: ``out x in``, any float dtype (computed in float32).
        rank: the target rank ``k >= 1``.

    Returns:
        `LowRank` with ``min(k, out, in)`` columns; singular values folded into ``b``.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    k = min(rank, s.shape[0])
    return LowRank(b=(u[:, :k] * s[:k]).contiguous(), a=vh[:k].contiguous(), relative_error=_relative_error(s, k))
