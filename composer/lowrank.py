"""Exact low-rank algebra: truncate a product ``B @ A`` without forming it, and the
truncated SVD of a dense matrix.

``truncate_product`` orthonormalizes ``B`` (``out x R``) through the Cholesky factor of
its small Gram matrix and eigendecomposes an ``R x R`` core: the result is the best
rank-``k`` approximation of ``B @ A`` in Frobenius norm (Eckart-Young), at
``O((out + in) R^2)`` cost instead of the ``O(out * in * min(out, in))`` of an SVD of the
dense product. Relative errors are exact, computed from the discarded singular values.
Pure functions: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LowRank", "truncate_product", "truncated_svd"]

_CHOLESKY_MAX_CONDITION = 1e5


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


def _orthonormal_root(m: Tensor) -> tuple[Tensor, Tensor, float]:
    """Factor ``m`` (``n x R``, float64) as ``Q @ root`` with ``Q = m @ inverse`` orthonormal
    (``n x p``) and ``root`` ``p x R``, from the small Gram matrix ``G = m^T m``; also return
    ``||m||_F^2`` (the trace of ``G``).

    Well-conditioned stacks (the usual case) take the Cholesky factor ``G = L L^T``:
    ``root = L^T`` and ``inverse = L^-T`` (a triangular solve on ``R x R``). ``Q`` loses
    orthogonality like ``eps * cond(m)^2``, so when ``||L||_F ||L^-1||_F`` (an upper bound of
    ``cond(m)``) exceeds ``1e5``, or the factorization fails (``m`` has dependent columns: a
    brick given twice), the eigendecomposition of ``G`` is used instead and directions
    beyond float32 precision are dropped, so rank-deficient stacks are exact too."""
    gram = m.T @ m
    norm_squared = float(gram.diagonal().sum())
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and lower.numel():
        eye = torch.eye(lower.shape[0], dtype=lower.dtype)
        inverse = torch.linalg.solve_triangular(lower.T, eye, upper=True)
        condition = float(torch.linalg.matrix_norm(lower)) * float(torch.linalg.matrix_norm(inverse))
        if math.isfinite(condition) and condition <= _CHOLESKY_MAX_CONDITION:
            return inverse, lower.T, norm_squared
    values, vectors = torch.linalg.eigh(gram)
    top = float(values[-1]) if values.numel() else 0.0
    keep = values > top * 1e-13 if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    values, vectors = values[keep], vectors[:, keep]
    singular = values.sqrt()
    return vectors / singular, singular[:, None] * vectors.T, norm_squared


def truncate_product(b: Tensor, a: Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of ``b @ a`` from the factors alone.

    With ``B = Q root`` (``Q`` orthonormal, from the Gram matrix ``B^T B``), the left
    singular vectors of ``B @ A`` are ``Q U`` where ``U`` diagonalizes the small ``p x p``
    matrix ``root (A A^T) root^T``; the best rank-k approximation is ``(Q U_k)(U_k^T root A)``.
    Only ``R x R`` matrices are decomposed: the cost is ``O((out + in) R^2)``, never an
    SVD of the dense ``out x in`` product. Computed in float64, returned in float32; when
    ``rank`` is at least the inner dimension the factors are returned unchanged (exact).

    Args:
        b: ``out x R``.
        a: ``R x in``.
        rank: the target rank ``k >= 1``.

    Returns:
        `LowRank` with at most ``k`` columns (fewer when ``b @ a`` has lower rank) and the
        exact relative Frobenius error of the truncation.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if rank >= a.shape[0]:
        return LowRank(b=b.to(torch.float32), a=a.to(torch.float32), relative_error=0.0)
    b32, a32 = b.to(torch.float32), a.to(torch.float32)
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    inverse, root, b_norm_squared = _orthonormal_root(b64)
    # B @ A = Q @ (root @ A); the p x p core (root A)(root A)^T = root (A A^T) root^T has the
    # squared singular values of B @ A as eigenvalues.
    a_gram = a64 @ a64.T
    core = root @ a_gram @ root.T
    values, vectors = torch.linalg.eigh(core)
    values, vectors = values.flip(0).clamp(min=0.0), vectors.flip(1)
    positive = int((values > 0).sum())
    k = max(1, min(rank, positive))
    total = float(values.sum())
    # A product that cancels to rounding noise (a brick at weights 1 and -1) is zero: error 0.
    scale_squared = b_norm_squared * float(a_gram.diagonal().sum())  # (||B|| ||A||)^2
    negligible = total <= 1e-24 * scale_squared
    error = 0.0 if negligible else math.sqrt(max(0.0, float(values[k:].sum())) / total)
    # The small coefficient matrices are exact to float64; the wide products are float32,
    # like the factors they produce.
    new_b = b32 @ (inverse @ vectors[:, :k]).to(torch.float32)  # Q @ U_k: orthonormal columns
    new_a = (vectors[:, :k].T @ root).to(torch.float32) @ a32  # U_k^T root A: carries the singular values
    return LowRank(b=new_b, a=new_a, relative_error=error)


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
