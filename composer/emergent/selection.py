"""Pick each function's neurons from `NeuronStatistics`: pure functions, no model, no I/O.

* ``lape`` (Tang et al., ACL 2024, "Language-Specific Neurons"; as in their ``identify.py``):
  ``p = p(neuron > 0 | function)``; entropy of ``p`` normalised over functions; a neuron is a
  candidate when some function's ``p`` is above the ``filter_rate`` quantile of all ``p``; the
  ``top_rate`` fraction of all neurons with the lowest entropy among candidates are selected,
  and each is given to every function whose ``p`` exceeds the ``activation_bar_ratio`` quantile.
  A neuron can belong to several functions, or (with a bar above the filter) to none.
* ``average_precision`` (the emergent-bricks paper): score each neuron by the average
  precision of its per-text mean ``|activation|`` at telling the function's texts from the
  others'; each function keeps the ``top_fraction`` of all neurons with the highest AP.

A neuron set maps a layer number to the sorted int64 indices of its neurons in that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from composer.emergent.statistics import NeuronStatistics
from composer.errors import InvalidParams, UnknownMethod

__all__ = [
    "SELECTION_METHODS",
    "AveragePrecisionParams",
    "LapeParams",
    "NeuronSet",
    "SelectionMethod",
    "average_precision",
    "select_average_precision",
    "select_lape",
    "select_neurons",
]

NeuronSet = dict[int, Tensor]
"""Layer number -> sorted int64 neuron indices in that layer."""

AP_BLOCK_ELEMENTS = 1 << 22
"""Texts x neurons scored at once by the AP method (bounds its temporary memory)."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class LapeParams(_Params):
    """LAPE's three rates, defaults from the authors' code."""

    top_rate: float = Field(0.01, gt=0.0, le=1.0, description="Fraction of all neurons selected (lowest entropy).")
    filter_rate: float = Field(
        0.95, gt=0.0, le=1.0, description="Quantile of all p that some function's p must exceed (candidates)."
    )
    activation_bar_ratio: float = Field(
        0.95, gt=0.0, le=1.0, description="Quantile of all p above which a selected neuron belongs to a function."
    )


class AveragePrecisionParams(_Params):
    """The paper's single parameter."""

    top_fraction: float = Field(0.05, gt=0.0, le=1.0, description="Fraction of all neurons kept per function.")


def _quantile_value(values: Tensor, rate: float) -> float:
    """The ``round(n * rate)``-th smallest value (1-based, clamped to [1, n]), as LAPE takes it."""
    n = values.numel()
    k = min(max(round(n * rate), 1), n)
    return float(values.kthvalue(k).values)


def _as_neuron_set(flat: Tensor, layers: tuple[int, ...], width: int) -> NeuronSet:
    flat = flat.sort().values
    rows, cols = flat // width, flat % width
    return {layer: cols[rows == i].to(torch.int64) for i, layer in enumerate(layers)}


def select_lape(
    stats: NeuronStatistics, *, top_rate: float = 0.01, filter_rate: float = 0.95, activation_bar_ratio: float = 0.95
) -> dict[str, NeuronSet]:
    """LAPE: low-entropy neurons with a high activation probability for some function.

    Ties in entropy are broken by position (layer, then neuron) so results are reproducible.
    Neurons that fail the filter are never selected, even when fewer than ``top_rate`` pass
    (the authors' code ranks them last with infinite entropy; with equal filter and bar
    rates, as there, they are then assigned to no function, so the results agree).

    Args:
        stats: statistics with at least one token per function.
        top_rate: fraction of all ``L * I`` neurons to select.
        filter_rate: quantile of all ``p`` a neuron's top ``p`` must exceed.
        activation_bar_ratio: quantile of all ``p`` a function's ``p`` must exceed to own the neuron.

    Returns:
        Function name -> neuron set (every layer present, possibly empty).
    """
    p = stats.activation_probability().permute(1, 2, 0).reshape(-1, len(stats.functions))  # [L*I, F]
    total = p.sum(dim=1, keepdim=True)
    normed = torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    entropy = -(normed * torch.where(normed > 0, normed.log(), torch.zeros_like(normed))).sum(dim=1)
    flat = p.reshape(-1)
    candidate = (p > _quantile_value(flat, filter_rate)).any(dim=1)
    entropy = torch.where(candidate, entropy, torch.full_like(entropy, torch.inf))
    count = min(round(entropy.numel() * top_rate), int(candidate.sum()))
    chosen = torch.sort(entropy, stable=True).indices[:count]
    owns = p[chosen] > _quantile_value(flat, activation_bar_ratio)  # [count, F]
    return {
        name: _as_neuron_set(chosen[owns[:, f]], stats.layers, stats.width) for f, name in enumerate(stats.functions)
    }


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of each column of ``scores`` at ranking the positive rows first.

    The step-wise definition (as scikit-learn's ``average_precision_score``): over the
    distinct score thresholds ``t`` from high to low, ``sum (R_t - R_prev) * P_t``, where
    ``P_t``/``R_t`` are precision/recall of ``score >= t``; tied scores form one threshold.

    Args:
        scores: ``[T, N]``, one column per neuron, one row per text.
        labels: ``[T]`` bool, at least one True.

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    labels = labels.to(torch.bool)
    positives = int(labels.sum())
    if positives == 0:
        raise InvalidParams("average precision needs at least one positive text")
    rows = scores.shape[0]
    order = torch.sort(scores.double(), dim=0, descending=True, stable=True)
    hits = labels[order.indices].double()  # [T, N], sorted by score
    true_positives = hits.cumsum(dim=0)
    # A tie group's precision is the one at its last row: find, per row, its group's last row.
    ends_group = torch.ones_like(hits, dtype=torch.bool)
    ends_group[:-1] = order.values[:-1] != order.values[1:]
    position = torch.arange(rows).unsqueeze(1).expand_as(hits)
    last = torch.where(ends_group, position, torch.full_like(position, rows))
    last = last.flip(0).cummin(dim=0).values.flip(0)
    precision_at_group = true_positives.gather(0, last) / (last + 1).double()
    return (hits * precision_at_group).sum(dim=0) / positives


def select_average_precision(stats: NeuronStatistics, *, top_fraction: float = 0.05) -> dict[str, NeuronSet]:
    """The paper's method: the ``top_fraction`` of all neurons with the highest AP per function.

    Ties in AP are broken by position (layer, then neuron).

    Args:
        stats: statistics kept with ``per_text=True``, with texts of at least two functions.
        top_fraction: fraction of all ``L * I`` neurons each function keeps.

    Returns:
        Function name -> neuron set (every layer present, possibly empty).
    """
    if stats.text_mean_abs.shape[0] == 0:
        raise InvalidParams("the AP method needs per-text statistics", ["collect them with per_text=True"])
    means = stats.text_mean_abs.reshape(stats.text_mean_abs.shape[0], -1)  # [T, L*I]
    count = max(round(means.shape[1] * top_fraction), 1)
    # AP sorts a float64 copy of the scores and keeps a few same-sized temporaries: blocks of
    # neurons bound that to ~AP_BLOCK_ELEMENTS * 40 bytes (a 7B model's 458k neurons x 1k
    # texts would otherwise take several GB).
    step = max(1, AP_BLOCK_ELEMENTS // max(means.shape[0], 1))
    result = {}
    for f, name in enumerate(stats.functions):
        labels = stats.text_function == f
        if labels.all():
            raise InvalidParams("the AP method needs texts of at least two functions")
        ap = torch.cat([average_precision(means[:, i : i + step], labels) for i in range(0, means.shape[1], step)])
        chosen = torch.sort(-ap, stable=True).indices[:count]
        result[name] = _as_neuron_set(chosen, stats.layers, stats.width)
    return result


@dataclass(frozen=True)
class SelectionMethod:
    """A selection method as the API lists it: name, description, params model, function."""

    name: str
    description: str
    params_model: type[_Params]
    select: Callable[..., dict[str, NeuronSet]]

    def params_schema(self) -> dict[str, Any]:
        """JSON schema of the parameters."""
        return self.params_model.model_json_schema()

    def validate(self, params: Mapping[str, Any] | None) -> _Params:
        """The parameters, validated and with defaults filled in.

        Raises:
            InvalidParams: listing every problem.
        """
        try:
            return self.params_model.model_validate(dict(params or {}))
        except ValidationError as error:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in error.errors()]
            raise InvalidParams(f"invalid parameters for {self.name}", problems) from None


SELECTION_METHODS: Mapping[str, SelectionMethod] = MappingProxyType(
    {
        "lape": SelectionMethod(
            "lape",
            "Low activation-probability entropy (Tang et al. 2024): neurons active mostly for few functions.",
            LapeParams,
            select_lape,
        ),
        "average_precision": SelectionMethod(
            "average_precision",
            "Per function, the neurons whose mean |activation| per text best ranks its texts first (AP).",
            AveragePrecisionParams,
            select_average_precision,
        ),
    }
)


def select_neurons(
    stats: NeuronStatistics, method: str, params: Mapping[str, Any] | None = None
) -> tuple[dict[str, NeuronSet], dict[str, Any]]:
    """Run a registered selection method with validated parameters.

    Args:
        stats: the probe statistics.
        method: a key of `SELECTION_METHODS`.
        params: the method's parameters (defaults for missing ones).

    Returns:
        ``(neuron sets by function, the parameters used, defaults filled in)``.

    Raises:
        UnknownMethod, InvalidParams.
    """
    chosen = SELECTION_METHODS.get(method)
    if chosen is None:
        raise UnknownMethod(f"unknown selection method {method!r}", [f"known: {', '.join(SELECTION_METHODS)}"])
    validated = chosen.validate(params)
    used = validated.model_dump()
    return chosen.select(stats, **used), used
