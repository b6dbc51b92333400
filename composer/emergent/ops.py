"""Exact tensor operations that use a neuron set in a composition. Pure: no modules, no I/O.

Neuron ``i`` of an FFN is output feature ``i`` of ``gate_proj``/``up_proj`` (GPT-2 ``c_fc``)
and input feature ``i`` of ``down_proj`` (GPT-2 ``mlp.c_proj``). In ``nn.Linear`` layout
(``out x in``) that is row ``i`` of the former and column ``i`` of the latter; GPT-2's
``Conv1D`` stores weights ``in x out`` (``fan_in_fan_out``), so the axes swap. LoRA factors
are always in ``nn.Linear`` layout (``A``: ``r x in``, ``B``: ``out x r``).

* `scale_neurons` / `ablate_neurons`: multiply the neurons' ``down_proj`` weights, i.e. their
  whole contribution to the residual stream, by a factor (0 removes them).
* `restrict_delta` / `restrict_lora`: keep a brick's update only on the neurons of the set
  (the sparse update of "Neuron Specialization", Tan et al. 2024). On a LoRA that is masking
  rows of ``B`` (neurons as outputs) or columns of ``A`` (neurons as inputs), so
  ``B' @ A' == mask(B @ A)`` exactly and the result is still a LoRA of the same rank.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor

from composer.errors import InvalidParams

__all__ = ["NeuronAxis", "ablate_neurons", "neuron_axis", "restrict_delta", "restrict_lora", "scale_neurons"]

NeuronAxis = Literal["in", "out"]
"""Whether a module's neurons are its input features (``down_proj``) or outputs (``up_proj``)."""

_FFN_MODULE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp\.(gate_proj|up_proj|c_fc|down_proj|c_proj)$")
_AXIS: dict[str, NeuronAxis] = {"gate_proj": "out", "up_proj": "out", "c_fc": "out", "down_proj": "in", "c_proj": "in"}


def neuron_axis(module: str) -> tuple[int, NeuronAxis] | None:
    """``(layer number, axis)`` of an FFN module name, or ``None`` for any other module.

    Args:
        module: a dotted module name such as ``model.layers.3.mlp.up_proj``.
    """
    match = _FFN_MODULE.search(module)
    return None if match is None else (int(match.group(1)), _AXIS[match.group(2)])


def _mask(length: int, indices: Tensor) -> Tensor:
    index = indices.to(torch.int64).reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
        raise InvalidParams("neuron index out of range", [f"indices must be in [0, {length})"])
    mask = torch.zeros(length, dtype=torch.bool)
    mask[index] = True
    return mask


def _dim(axis: NeuronAxis, fan_in_fan_out: bool) -> int:
    # nn.Linear weights are out x in: outputs are dim 0, inputs dim 1; Conv1D swaps them.
    dim = 0 if axis == "out" else 1
    return 1 - dim if fan_in_fan_out else dim


def scale_neurons(
    weight: Tensor, indices: Tensor, factor: float, *, axis: NeuronAxis = "in", fan_in_fan_out: bool = False
) -> Tensor:
    """Multiply the given neurons' slices of a weight by ``factor``.

    Args:
        weight: a full weight (``down_proj`` for the default ``axis="in"``).
        indices: int64 neuron indices of this layer.
        factor: the multiplier (0 ablates).
        axis: whether neurons are the weight's inputs or outputs.
        fan_in_fan_out: the weight is stored ``in x out`` (GPT-2 ``Conv1D``).

    Returns:
        A new tensor of the weight's shape and dtype, computed in float32.
    """
    dim = _dim(axis, fan_in_fan_out)
    mask = _mask(weight.shape[dim], indices)
    shape = [1, 1]
    shape[dim] = -1
    scales = torch.where(mask, torch.tensor(float(factor)), torch.tensor(1.0)).reshape(shape)
    return (weight.to(torch.float32) * scales).to(weight.dtype)


def ablate_neurons(weight: Tensor, indices: Tensor, *, axis: NeuronAxis = "in", fan_in_fan_out: bool = False) -> Tensor:
    """`scale_neurons` with factor 0: the neurons' slices zeroed, everything else unchanged."""
    return scale_neurons(weight, indices, 0.0, axis=axis, fan_in_fan_out=fan_in_fan_out)


def restrict_delta(delta: Tensor, indices: Tensor, *, axis: NeuronAxis, fan_in_fan_out: bool = False) -> Tensor:
    """A dense update kept only on the given neurons' slices (zero elsewhere).

    Args:
        delta: an update laid out like the base weight.
        indices: the neurons to keep.
        axis: whether neurons are the module's inputs (``down_proj``) or outputs (``gate/up_proj``).
        fan_in_fan_out: the update is stored ``in x out``.

    Returns:
        A new tensor.
    """
    dim = _dim(axis, fan_in_fan_out)
    mask = _mask(delta.shape[dim], indices)
    shape = [1, 1]
    shape[dim] = -1
    return delta * mask.reshape(shape).to(delta.dtype)


def restrict_lora(a: Tensor, b: Tensor, indices: Tensor, *, axis: NeuronAxis) -> tuple[Tensor, Tensor]:
    """A LoRA's factors restricted to the given neurons, still a LoRA of the same rank.

    Args:
        a: ``r x in`` factor.
        b: ``out x r`` factor.
        indices: the neurons to keep.
        axis: ``"out"``: neurons are outputs (mask rows of ``B``); ``"in"``: inputs (mask columns of ``A``).

    Returns:
        ``(A', B')`` with ``B' @ A'`` equal to ``B @ A`` restricted to the neurons.
    """
    if axis == "out":
        mask = _mask(b.shape[0], indices).to(b.dtype).unsqueeze(1)
        return a.clone(), b * mask
    mask = _mask(a.shape[1], indices).to(a.dtype).unsqueeze(0)
    return a * mask, b.clone()
