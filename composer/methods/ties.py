"""``ties``: TIES-merging (trim, elect sign, disjoint mean), Yadav et al. 2023."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from composer.methods.base import MergeContext, MergeMethod, MethodParams, SignMethod, density_field, sign_method_field

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["TIES", "TiesParams", "merge_ties"]


class TiesParams(MethodParams):
    """Parameters of ``ties``."""

    density: float = density_field("Fraction of each brick's delta entries kept, by magnitude, in (0, 1].")
    majority_sign_method: SignMethod = sign_method_field()


def merge_ties(deltas: Sequence[Tensor], weights: Sequence[float], params: TiesParams, context: MergeContext) -> Tensor:
    """TIES: trim each delta to ``density`` by magnitude, elect a sign per entry from the
    trimmed deltas, and average the weighted deltas that agree with it.

    Args:
        deltas: one float32 delta per brick that targets the module.
        weights: the bricks' weights (applied after the sign election, as in PEFT).
        params: density and majority sign method.
        context: unused (TIES is deterministic).

    Returns:
        The merged delta.
    """
    import torch

    from composer.methods import ops

    trimmed = torch.stack([ops.trim_to_density(delta, params.density) for delta in deltas])
    mask = ops.majority_sign_mask(trimmed, params.majority_sign_method)
    trimmed.mul_(torch.tensor(list(weights), dtype=trimmed.dtype).reshape(-1, *([1] * (trimmed.dim() - 1))))
    return ops.disjoint_mean(trimmed, mask)


TIES = MergeMethod(
    name="ties",
    description="TIES: trim each delta to `density` by magnitude, elect signs, average the agreeing entries.",
    params_model=TiesParams,
    combine=merge_ties,
)
