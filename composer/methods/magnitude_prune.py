"""``magnitude_prune``: trim each delta to ``density`` by magnitude, then a weighted sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from composer.methods.base import MergeContext, MergeMethod, MethodParams, density_field

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["MAGNITUDE_PRUNE", "MagnitudePruneParams", "merge_magnitude_prune"]


class MagnitudePruneParams(MethodParams):
    """Parameters of ``magnitude_prune``."""

    density: float = density_field("Fraction of each brick's delta entries kept, by magnitude, in (0, 1].")


def merge_magnitude_prune(
    deltas: Sequence[Tensor], weights: Sequence[float], params: MagnitudePruneParams, context: MergeContext
) -> Tensor:
    """Keep each delta's ``density`` largest-magnitude entries, then sum with the weights.

    Args:
        deltas: one float32 delta per brick that targets the module.
        weights: the bricks' weights.
        params: density.
        context: unused (deterministic).

    Returns:
        The merged delta.
    """
    from composer.methods import ops

    return ops.weighted_sum([ops.trim_to_density(delta, params.density) for delta in deltas], weights)


MAGNITUDE_PRUNE = MergeMethod(
    name="magnitude_prune",
    description="Keep each delta's `density` largest-magnitude entries, then take the weighted sum.",
    params_model=MagnitudePruneParams,
    combine=merge_magnitude_prune,
)
