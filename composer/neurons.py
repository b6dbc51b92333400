"""Neuron operations in a composition: what an emergent brick (a neuron set) does to a recipe.

* ``ablate`` / ``scale``: multiply the set's neurons' contributions to the residual stream
  (columns of each layer's ``down_proj``; rows of a GPT-2 ``mlp.c_proj``) by ``factor``
  (0 for ablate) in the composed weights. Applied after the merge, to the streamed output
  tensor, so the result is exactly "merged model, then those columns scaled". Full output
  only: an adapter cannot express a multiplicative change of the base.
* ``restrict``: keep one brick's update only on the set's neurons (rows of ``gate/up_proj``,
  columns of ``down_proj``), applied to its LoRA factors as they are read (rows of ``B`` or
  columns of ``A`` masked, `composer.emergent.restrict_lora`), so ``B' @ A'`` is exactly the
  masked delta and an adapter output stays a LoRA. The brick's updates of modules that are
  not FFN projections hold no neuron and are dropped. Plain LoRA contributions only (a DoRA
  or a saved module copy is not restricted by masking factors).

Neuron sets come in as paths of neuron files (`composer.save_neuron_set`); they are a few
kilobytes and read while planning, to check every index against the base's FFN widths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from composer.basemodel import LinearModule

if TYPE_CHECKING:
    from torch import Tensor

    from composer.lora import Factors

__all__ = ["NEURON_OPS", "NeuronOp", "NeuronPlan", "plan_neuron_ops", "restricted_factors"]

NeuronOpKind = Literal["ablate", "scale", "restrict"]
NEURON_OPS: tuple[NeuronOpKind, ...] = ("ablate", "scale", "restrict")


@dataclass(frozen=True)
class NeuronOp:
    """One operation with a neuron set.

    ``name`` labels it in errors (e.g. ``"code-neurons@1"``); ``neurons_path`` is its neuron
    file; ``factor`` is the multiplier of ``scale``; ``target`` is, for ``restrict``, the
    index of the brick restricted (in recipe order), None for every brick.
    """

    name: str
    op: str
    neurons_path: Path
    factor: float | None = None
    target: int | None = None


@dataclass(frozen=True)
class NeuronPlan:
    """The validated operations: ``restrictions`` maps a brick index to the union of the
    neurons it is restricted to (``layer -> int64 indices``); ``scales`` maps a module
    (a ``down_proj``) to its ``(indices, factor)`` multiplications, in recipe order."""

    restrictions: Mapping[int, Mapping[int, Tensor]]
    scales: Mapping[str, tuple[tuple[Tensor, float], ...]]

    @property
    def empty(self) -> bool:
        """Whether there is nothing to do."""
        return not self.restrictions and not self.scales


EMPTY = NeuronPlan({}, {})


def plan_neuron_ops(
    ops: Sequence[NeuronOp], linear: Mapping[str, LinearModule], *, bricks: int, output: str, problems: list[str]
) -> NeuronPlan:
    """Read and check the neuron sets of ``ops`` against the base's FFN modules.

    Args:
        ops: the operations, in recipe order.
        linear: the base's mergeable modules by name.
        bricks: how many bricks the recipe has (``restrict`` targets index them).
        output: the output kind (``ablate``/``scale`` need ``"full"``).
        problems: where every problem is appended (the caller raises once).

    Returns:
        The plan (empty parts where a problem was found).
    """
    if not ops:
        return EMPTY
    import torch

    from composer.emergent import load_neuron_set, neuron_axis
    from composer.errors import InvalidTensorFile

    down: dict[int, LinearModule] = {}
    for name, module in linear.items():
        found = neuron_axis(name)
        if found is not None and found[1] == "in":
            down[found[0]] = module
    restrictions: dict[int, dict[int, Tensor]] = {}
    scales: dict[str, list[tuple[Tensor, float]]] = {}
    for op in ops:
        where = f"neurons {op.name!r} ({op.op})"
        if op.op not in NEURON_OPS:
            problems.append(f"{where}: op must be one of {', '.join(NEURON_OPS)}")
            continue
        try:
            neurons = load_neuron_set(Path(op.neurons_path)).neurons
        except InvalidTensorFile as exc:
            problems.append(f"{where}: {exc.message}: {'; '.join(exc.problems)}")
            continue
        except OSError as exc:
            problems.append(f"{where}: cannot read the neuron file: {exc.strerror or exc}")
            continue
        bad = False
        for layer, index in neurons.items():
            found_module = down.get(layer)
            if found_module is None:
                problems.append(f"{where}: the base model has no FFN output projection in layer {layer}")
                bad = True
            elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= found_module.in_features):
                width = found_module.in_features
                problems.append(f"{where}: layer {layer} has {width} neurons; indices out of range")
                bad = True
        if bad:
            continue
        if op.op == "restrict":
            if op.factor is not None:
                problems.append(f"{where}: restrict takes no factor")
            targets = range(bricks) if op.target is None else [op.target]
            if op.target is not None and not 0 <= op.target < bricks:
                problems.append(f"{where}: target brick {op.target} is not in the recipe ({bricks} bricks)")
                continue
            for target in targets:
                merged = restrictions.setdefault(target, {})
                for layer, index in neurons.items():
                    previous = merged.get(layer)
                    merged[layer] = index if previous is None else torch.unique(torch.cat([previous, index]))
            continue
        if output != "full":
            problems.append(f"{where}: {op.op} changes the base weights and needs output 'full', not {output!r}")
            continue
        if op.target is not None:
            problems.append(f"{where}: {op.op} applies to the composed model and takes no target")
        factor = 0.0 if op.op == "ablate" else op.factor
        if op.op == "ablate" and op.factor is not None:
            problems.append(f"{where}: ablate takes no factor (it is scale with factor 0)")
        if factor is None or isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor != factor:
            problems.append(f"{where}: scale needs a finite factor")
            continue
        for layer, index in neurons.items():
            scales.setdefault(down[layer].name, []).append((index, float(factor)))
    return NeuronPlan(restrictions, {k: tuple(v) for k, v in scales.items()})


def restricted_factors(module: str, factors: Factors, neurons: Mapping[int, Tensor]) -> Factors:
    """A brick's factors on ``module`` restricted to ``neurons`` (zero outside FFN modules and
    on layers without neurons of the set)."""
    from dataclasses import replace

    import torch

    from composer.emergent import neuron_axis, restrict_lora

    found = neuron_axis(module)
    if found is None:
        return replace(factors, b=torch.zeros_like(factors.b))
    layer, axis = found
    index = neurons.get(layer, torch.zeros(0, dtype=torch.int64))
    a, b = restrict_lora(factors.a, factors.b, index, axis=axis)
    return replace(factors, a=a, b=b)
