"""Check neuron sets by ablation: zero them, measure every function's held-out loss.

Zeroing neuron ``i`` of a layer (its input to ``down_proj``) is exactly zeroing column ``i``
of ``down_proj``'s weight (row ``i`` of a GPT-2 ``Conv1D``); done with a pre-hook, so the
model's weights are never touched. Each set is compared with the same number of random
neurons in the same layers (seeded), as in the emergent-bricks paper's pruning table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from composer.emergent.selection import NeuronSet
from composer.emergent.statistics import ProbeBatch, ffn_output_projections, projection_width, unpack_batch
from composer.errors import InvalidParams

__all__ = ["VerificationTable", "ablated", "mean_loss", "random_like", "verify_neuron_sets"]

RANDOM_PREFIX = "random:"


@contextmanager
def ablated(model: nn.Module, neurons: NeuronSet, factor: float = 0.0) -> Iterator[None]:
    """Within the block, multiply the given neurons' activations by ``factor`` (0 = ablate).

    Args:
        model: the model whose FFN output projections are hooked.
        neurons: layer number -> neuron indices.
        factor: the multiplier (``0`` zeroes them).

    Raises:
        InvalidParams: a layer the model does not have, or an index out of range.
    """
    projections = ffn_output_projections(model)
    problems = []
    for layer, index in neurons.items():
        if layer not in projections:
            problems.append(f"layer {layer} has no FFN")
        elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= projection_width(projections[layer])):
            problems.append(f"layer {layer}: neuron index out of range")
    if problems:
        raise InvalidParams("neuron set does not fit the model", problems)

    def hook(index: Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def scale(_module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            x = inputs[0].clone()
            x[..., index.to(x.device)] *= factor
            return (x, *inputs[1:])

        return scale

    handles = [
        projections[layer].register_forward_pre_hook(hook(index)) for layer, index in neurons.items() if index.numel()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mean_loss(model: nn.Module, batches: Iterable[ProbeBatch]) -> float:
    """Mean next-token cross-entropy over every predicted, unpadded token of the batches.

    Args:
        model: a causal LM returning ``.logits``.
        batches: token ids (with masks for padded rows).

    Returns:
        The token-weighted mean loss (nats).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            ids, mask = unpack_batch(batch)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
            targets = mask[:, 1:] & mask[:, :-1]
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += float(losses[targets].double().sum())
            count += int(targets.sum())
    if count == 0:
        raise InvalidParams("held-out probes have no token to predict")
    return total / count


def random_like(neurons: NeuronSet, width: int, seed: int) -> NeuronSet:
    """As many uniformly random neurons per layer as ``neurons`` has, sorted (seeded).

    Args:
        neurons: the set whose per-layer sizes to match.
        width: neurons per layer.
        seed: seed of the draw; layer ``l`` uses ``seed + l`` so sets are independent of order.

    Returns:
        A neuron set with the same layers and sizes.
    """
    drawn = {}
    for layer, index in neurons.items():
        generator = torch.Generator().manual_seed(seed + layer)
        drawn[layer] = torch.randperm(width, generator=generator)[: index.numel()].sort().values
    return drawn


@dataclass(frozen=True)
class VerificationTable:
    """Held-out losses with and without each ablation.

    Attributes:
        base_loss: function -> loss of the intact model.
        loss: ablated set name -> function -> loss with that set zeroed. Set names are the
            functions' names and ``random:<function>`` for the matching random sets.
        sizes: ablated set name -> number of neurons.
    """

    base_loss: dict[str, float]
    loss: dict[str, dict[str, float]]
    sizes: dict[str, int]

    def relative_increase(self) -> dict[str, dict[str, float]]:
        """Ablated set -> function -> ``(loss - base) / base``."""
        return {
            ablated_set: {f: (value - self.base_loss[f]) / self.base_loss[f] for f, value in row.items()}
            for ablated_set, row in self.loss.items()
        }

    def specificity(self, function: str) -> float:
        """Own-function increase over the mean increase of the other functions, for ``function``'s
        set. When the others do not rise on average (mean <= 0) the ratio means nothing: then
        ``inf`` if the own loss rises and ``0.0`` if not. Needs at least two functions."""
        row = self.relative_increase()[function]
        others = [v for f, v in row.items() if f != function]
        if not others:
            raise InvalidParams("specificity needs at least two functions")
        mean_other = sum(others) / len(others)
        if mean_other > 0:
            return row[function] / mean_other
        return float("inf") if row[function] > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored with an emergent brick."""
        return {
            "base_loss": self.base_loss,
            "loss": self.loss,
            "sizes": self.sizes,
            "relative_increase": self.relative_increase(),
        }


def verify_neuron_sets(
    model: nn.Module,
    held_out: Mapping[str, Sequence[ProbeBatch]],
    neuron_sets: Mapping[str, NeuronSet],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VerificationTable:
    """Ablate each function's set and a random set of the same shape; measure every loss.

    Args:
        model: the base model (left unchanged).
        held_out: function -> held-out batches (read once per ablation, so a sequence).
        neuron_sets: function -> its neurons (names need not match ``held_out``'s).
        seed: seed of the random sets.
        progress: called with each ablated set's name before it is measured (raise to cancel).

    Returns:
        The table of losses.
    """
    width = projection_width(next(iter(ffn_output_projections(model).values())))
    base = {f: mean_loss(model, batches) for f, batches in held_out.items()}
    ablations: dict[str, NeuronSet] = {}
    for name, neurons in neuron_sets.items():
        ablations[name] = neurons
        ablations[RANDOM_PREFIX + name] = random_like(neurons, width, seed)
    loss: dict[str, dict[str, float]] = {}
    for name, neurons in ablations.items():
        if progress is not None:
            progress(name)
        with ablated(model, neurons):
            loss[name] = {f: mean_loss(model, batches) for f, batches in held_out.items()}
    sizes = {name: sum(int(i.numel()) for i in neurons.values()) for name, neurons in ablations.items()}
    return VerificationTable(base_loss=base, loss=loss, sizes=sizes)
