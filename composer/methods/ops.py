"""Pure tensor functions that merge methods are assembled from.

Every function takes task deltas (``delta_i = s_i * B_i @ A_i``, one per brick, in float32)
and returns a tensor; none does I/O or keeps state. Semantics follow the papers as
implemented by PEFT (``peft.utils.merge_utils``), so PEFT is a usable oracle:

* TIES (Yadav et al., 2023): trim each delta to its ``density`` largest magnitudes, elect a
  sign per entry from the trimmed, unweighted deltas, then average the weighted deltas that
  agree with the elected sign (``disjoint_mean``).
* DARE (Yu et al., 2023): keep each entry with probability ``density`` and rescale the
  kept entries by ``1 / density``, so the expected value of a delta is unchanged.

This module imports torch: only the compose path imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "disjoint_mean",
    "majority_sign_mask",
    "mask_generator",
    "mask_seed",
    "random_keep",
    "trim_to_density",
    "weighted_sum",
]

SignMethod = Literal["total", "frequency"]


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Task arithmetic: ``sum_i weights[i] * deltas[i]``.

    Args:
        deltas: tensors of one shape.
        weights: one float per delta.

    Returns:
        A new tensor of that shape.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"need as many weights as deltas (and at least one), got {len(weights)} and {len(deltas)}")
    out = deltas[0] * weights[0]
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        out.add_(delta, alpha=weight)
    return out


def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest.

    Equal magnitudes at the threshold are broken by position (lowest flat index first), so
    exactly ``k`` entries survive. A ``density`` of 1 or more keeps everything.

    Args:
        delta: any tensor.
        density: fraction of entries to keep, in [0, 1].

    Returns:
        A new tensor of the same shape.
    """
    numel = delta.numel()
    k = int(density * numel)
    if k >= numel:
        return delta.clone()
    if k <= 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().reshape(-1)
    # kthvalue is several times faster than topk on large tensors; the k-th largest is the
    # (numel - k + 1)-th smallest.
    threshold = torch.kthvalue(magnitude, numel - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = torch.nonzero(magnitude == threshold).reshape(-1)[:missing]
        keep[at_threshold] = True
    return torch.where(keep.reshape(delta.shape), delta, torch.zeros((), dtype=delta.dtype))


def random_keep(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop and rescale: keep each entry with probability ``density``, divide by it.

    The mask is ``uniform < density`` drawn from ``generator``, which is the same stream of
    decisions as ``torch.bernoulli(torch.full_like(delta, density), generator=generator)``.

    Args:
        delta: any float tensor.
        density: keep probability in (0, 1]; 1 keeps everything and draws nothing.
        generator: the source of randomness (seeded by the caller for reproducibility).

    Returns:
        A new tensor of the same shape whose expectation over the mask equals ``delta``.
    """
    if density >= 1:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype))


def majority_sign_mask(stacked: Tensor, method: SignMethod = "total") -> Tensor:
    """TIES sign election over dimension 0 of ``stacked``.

    Args:
        stacked: deltas stacked on dimension 0.
        method: ``"total"`` elects the sign of the sum of values, ``"frequency"`` the sign
            held by more deltas; a tie elects ``+``.

    Returns:
        Boolean mask of ``stacked``'s shape: entries whose sign equals the elected sign
        (zeros never agree).
    """
    sign = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {method!r}")
    elected = torch.where(score >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean over dimension 0 of the entries selected by ``mask`` (0 where none is).

    Args:
        weighted: weighted deltas stacked on dimension 0.
        mask: boolean mask of the same shape.

    Returns:
        A tensor of ``weighted.shape[1:]``.
    """
    total = torch.where(mask, weighted, torch.zeros((), dtype=weighted.dtype)).sum(dim=0)
    count = mask.sum(dim=0).clamp_(min=1)
    return total / count


def mask_generator(seed: int, module: str, brick_key: str) -> torch.Generator:
    """A generator for one brick's random mask on one module, seeded by `mask_seed`."""
    return torch.Generator().manual_seed(mask_seed(seed, module, brick_key))


def mask_seed(seed: int, module: str, brick_key: str) -> int:
    """The 63-bit seed of a brick's mask: sha256 of ``"{seed}:{module}:{brick_key}"``.

    Each (module, brick) pair gets its own stream, so random choices depend neither on the
    order of modules nor on the order of bricks, and changing one brick changes no other
    brick's mask.
    """
    digest = hashlib.sha256(f"{seed}:{module}:{brick_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
