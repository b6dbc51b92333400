"""``linear``: task arithmetic, ``sum_i w_i * delta_i``. Exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from composer.methods.base import MergeContext, MergeMethod, MethodParams

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["LINEAR", "LinearParams", "merge_linear"]


class LinearParams(MethodParams):
    """``linear`` has no parameters: the brick weights are the whole recipe."""


def merge_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], params: LinearParams, context: MergeContext
) -> Tensor:
    """Weighted sum of the deltas.

    Args:
        deltas: one float32 delta per brick that targets the module.
        weights: the bricks' weights.
        params: unused (no parameters).
        context: unused.

    Returns:
        ``sum_i weights[i] * deltas[i]``.
    """
    from composer.methods import ops

    return ops.weighted_sum(deltas, weights)


LINEAR = MergeMethod(
    name="linear",
    description="Task arithmetic: the weighted sum of the bricks' deltas (exact).",
    params_model=LinearParams,
    combine=merge_linear,
    sums_deltas=True,
)
