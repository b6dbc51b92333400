"""LoRA algebra on one module: ``delta = s * B @ A``, weighted factor stacks, and the
deltas that depend on the base weight (DoRA, saved module copies).

``A`` is ``r x in`` and ``B`` is ``out x r`` for every PEFT LoRA layer; for GPT-2 style
``Conv1D`` modules (``fan_in_fan_out``) the *base weight* is stored ``in x out``, so the
delta added to it is the transpose. Scalings (``alpha / r`` or ``alpha / sqrt(r)`` with
rsLoRA, after ``rank_pattern``/``alpha_pattern``) come from `composer.adapter.LoraSettings`.
Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Factors", "content_key", "copy_delta", "delta", "dora_delta", "oriented", "stacked_factors", "tensor_key"]


@dataclass(frozen=True)
class Factors:
    """One brick's factors for one module, with its LoRA scaling ``s`` and recipe weight ``w``."""

    a: Tensor  # r x in
    b: Tensor  # out x r
    scaling: float
    weight: float = 1.0

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.a.shape[0])


def delta(factors: Factors) -> Tensor:
    """The brick's unweighted update ``s * B @ A`` in float32 (``out x in``)."""
    a = factors.a.to(torch.float32)
    b = factors.b.to(torch.float32)
    return torch.mm(b, a).mul_(factors.scaling)


def stacked_factors(parts: Sequence[Factors]) -> tuple[Tensor, Tensor]:
    """Concatenated factors ``(B_cat, A_cat)`` with ``B_cat @ A_cat = sum_i w_i * s_i * B_i @ A_i``.

    ``B_cat = [B_1 | ... | B_n]`` (``out x sum r_i``) and ``A_cat`` stacks ``w_i * s_i * A_i``
    (``sum r_i x in``): the exact weighted sum of deltas, at the cost of one matmul.

    Args:
        parts: at least one brick's factors for the same module.

    Returns:
        ``(B_cat, A_cat)`` in float32.
    """
    if not parts:
        raise ValueError("no factors to stack")
    a_cat = torch.cat([p.a.to(torch.float32) * (p.weight * p.scaling) for p in parts], dim=0)
    b_cat = torch.cat([p.b.to(torch.float32) for p in parts], dim=1)
    return b_cat, a_cat


def oriented(update: Tensor, fan_in_fan_out: bool) -> Tensor:
    """``update`` laid out like the base weight it is added to (transposed for ``Conv1D``)."""
    return update.T if fan_in_fan_out else update


def content_key(factors: Factors) -> str:
    """sha256 (hex) of A's bytes then B's bytes as stored: identifies a brick's content on
    one module, independent of its name, weight and position in the recipe."""
    return tensor_key(factors.a, factors.b)


def dora_delta(weight: Tensor, factors: Factors, magnitude: Tensor) -> Tensor:
    """A DoRA brick's update ``W' - W`` in float32 (``out x in``), as PEFT merges it.

    ``V = W + s * B @ A``, ``W' = (m / ||V||) * V`` where ``||V||`` is the L2 norm of each
    output row of ``V`` (PEFT's ``DoraLinearLayer.get_weight_norm``: norm over ``dim=1`` of
    the ``out x in`` weight; for an embedding, over the vocabulary for each hidden unit) and
    ``m`` is ``lora_magnitude_vector``.

    Args:
        weight: the base weight laid out ``out x in`` (any float dtype).
        factors: the brick's factors and scaling (its recipe weight is not applied here).
        magnitude: the ``out``-long magnitude vector.

    Returns:
        The unweighted delta ``W' - W``.
    """
    base = weight.to(torch.float32)
    merged = delta(factors).add_(base)
    norm = torch.linalg.vector_norm(merged, dim=1)
    return merged.mul_((magnitude.to(torch.float32) / norm).unsqueeze(1)).sub_(base)


def copy_delta(weight: Tensor, saved: Tensor) -> Tensor:
    """A saved module copy's update ``W_saved - W`` in float32 (same layout as both)."""
    return saved.to(torch.float32) - weight.to(torch.float32)


def tensor_key(*tensors: Tensor) -> str:
    """sha256 (hex) of the tensors' bytes as stored, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    return digest.hexdigest()
