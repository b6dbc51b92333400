"""``dare_linear`` and ``dare_ties``: DARE drop-and-rescale (Yu et al. 2023), then a
weighted sum or a TIES sign election and disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from composer.methods.base import (
    MergeContext,
    MergeMethod,
    MethodParams,
    SignMethod,
    density_field,
    seed_field,
    sign_method_field,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DARE_LINEAR", "DARE_TIES", "DareLinearParams", "DareTiesParams", "merge_dare_linear", "merge_dare_ties"]

_DENSITY = "Keep probability of each delta entry, in (0, 1]; kept entries are divided by it."


class DareLinearParams(MethodParams):
    """Parameters of ``dare_linear``."""

    density: float = density_field(_DENSITY)
    seed: int = seed_field()


class DareTiesParams(MethodParams):
    """Parameters of ``dare_ties``."""

    density: float = density_field(_DENSITY)
    majority_sign_method: SignMethod = sign_method_field()
    seed: int = seed_field()


def _dropped(deltas: Sequence[Tensor], density: float, seed: int, context: MergeContext) -> list[Tensor]:
    from composer.methods import ops

    if len(context.brick_keys) != len(deltas):
        raise ValueError("DARE needs one brick key per delta to seed its masks")
    # One stream per (module, brick content): independent of brick and module order.
    return [
        ops.random_keep(delta, density, ops.mask_generator(seed, context.module, key))
        for delta, key in zip(deltas, context.brick_keys, strict=True)
    ]


def merge_dare_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], params: DareLinearParams, context: MergeContext
) -> Tensor:
    """DARE then task arithmetic: ``sum_i w_i * (m_i * delta_i) / density``, ``m_i ~ Bernoulli(density)``.

    Args:
        deltas: one float32 delta per brick that targets the module.
        weights: the bricks' weights.
        params: density and seed.
        context: the module and brick keys that, with the seed, select the random masks.

    Returns:
        The merged delta; its expectation over the masks is the ``linear`` merge.
    """
    from composer.methods import ops

    return ops.weighted_sum(_dropped(deltas, params.density, params.seed, context), weights)


def merge_dare_ties(
    deltas: Sequence[Tensor], weights: Sequence[float], params: DareTiesParams, context: MergeContext
) -> Tensor:
    """DARE then TIES' sign election and disjoint mean (no magnitude trim).

    Args:
        deltas: one float32 delta per brick that targets the module.
        weights: the bricks' weights (applied after the sign election, as in PEFT).
        params: density, majority sign method and seed.
        context: the module and brick keys that, with the seed, select the random masks.

    Returns:
        The merged delta.
    """
    import torch

    from composer.methods import ops

    dropped = torch.stack(_dropped(deltas, params.density, params.seed, context))
    mask = ops.majority_sign_mask(dropped, params.majority_sign_method)
    dropped.mul_(torch.tensor(list(weights), dtype=dropped.dtype).reshape(-1, *([1] * (dropped.dim() - 1))))
    return ops.disjoint_mean(dropped, mask)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    description="DARE: randomly keep each delta entry with probability `density`, rescale, then sum (seeded).",
    params_model=DareLinearParams,
    combine=merge_dare_linear,
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    description="DARE drop-and-rescale, then TIES sign election and disjoint mean (seeded).",
    params_model=DareTiesParams,
    combine=merge_dare_ties,
)
