"""Per-neuron activation statistics of a causal LM's FFN layers, gathered with forward hooks.

The quantity is the input of each layer's FFN output projection (``mlp.down_proj``; GPT-2:
``mlp.c_proj``), i.e. ``act(gate) * up`` for SwiGLU and ``act(fc(x))`` for GPT-2; a neuron is
*active* on a token when that value is ``> 0``. LAPE's original code thresholds ``SiLU(gate)``
instead (the same sign as ``gate``); on SwiGLU the two differ by the sign of ``up``. We use
the value that actually reaches ``down_proj``, the one an ablation removes.

Memory is bounded by the statistics, never by the number of tokens: for ``F`` functions,
``L`` layers of ``I`` neurons and ``T`` probe texts, ``16 * F * L * I`` bytes of counts and
sums plus ``4 * T * L * I`` bytes of per-text means (the AP method's input; skip them with
``per_text=False``). Activations live only inside one hook call, one layer of one batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from composer.errors import InvalidBaseModel, InvalidParams

__all__ = ["NeuronStatistics", "ProbeBatch", "collect_statistics", "ffn_output_projections"]

ProbeBatch = Tensor | tuple[Tensor, Tensor]
"""Token ids ``[B, T]`` (one text per row), or ``(ids, attention_mask)`` for padded rows."""

# layers.N.mlp.down_proj (Llama, Mistral, Qwen, Gemma, ...) and h.N.mlp.c_proj (GPT-2).
_OUTPUT_PROJECTION = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp\.(?:down_proj|c_proj)$")


@dataclass(frozen=True)
class NeuronStatistics:
    """Counts and sums per function and neuron; every tensor is indexed ``[..., layer, neuron]``
    with layers in the order of ``layers``.

    Attributes:
        functions: the probe sets' names, in order (index ``f`` below).
        layers: the model's layer numbers that have an FFN.
        tokens: ``[F]`` int64, tokens seen per function (padding excluded).
        positive: ``[F, L, I]`` int64, tokens on which the neuron was ``> 0``.
        abs_sum: ``[F, L, I]`` float64, sum of ``|activation|`` over those tokens.
        text_mean_abs: ``[T, L, I]`` float32, mean ``|activation|`` over each text's tokens
            (empty ``[0, L, I]`` when not kept).
        text_function: ``[T]`` int64, the function index of each text.
    """

    functions: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: Tensor
    positive: Tensor
    abs_sum: Tensor
    text_mean_abs: Tensor
    text_function: Tensor

    @property
    def width(self) -> int:
        """Neurons per layer (the FFN's intermediate size)."""
        return int(self.positive.shape[-1])

    def activation_probability(self) -> Tensor:
        """``p(neuron > 0 | function)``: ``[F, L, I]`` float64."""
        return self.positive.double() / self.tokens.double().clamp_min(1).view(-1, 1, 1)

    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors (the memory bound in the module docstring)."""
        tensors = (self.tokens, self.positive, self.abs_sum, self.text_mean_abs, self.text_function)
        return sum(t.numel() * t.element_size() for t in tensors)


def ffn_output_projections(model: nn.Module) -> dict[int, nn.Module]:
    """Each layer's FFN output projection (``down_proj`` / GPT-2 ``mlp.c_proj``), by layer number.

    Raises:
        InvalidBaseModel: the model has none.
    """
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = _OUTPUT_PROJECTION.search(name)
        if match:
            found[int(match.group(1))] = module
    if not found:
        raise InvalidBaseModel("no FFN output projection found", ["expected modules named layers.N.mlp.down_proj"])
    return dict(sorted(found.items()))


def projection_width(module: nn.Module) -> int:
    """Input features of an FFN output projection: ``nn.Linear.in_features`` or ``Conv1D.nx``."""
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    if width is None:
        raise InvalidBaseModel(f"cannot tell the input width of {type(module).__name__}")
    return int(width)


def unpack_batch(batch: ProbeBatch) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` of a probe batch: int64 ``[B, T]`` ids and a bool ``[B, T]`` mask."""
    ids, mask = batch if isinstance(batch, tuple) else (batch, None)
    if ids.dim() != 2:
        raise InvalidParams("a probe batch must be 2-D token ids [texts, tokens]", [f"got shape {tuple(ids.shape)}"])
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if mask.shape != ids.shape:
        raise InvalidParams("attention mask and ids differ in shape", [f"{tuple(mask.shape)} != {tuple(ids.shape)}"])
    return ids.long(), mask


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``PreTrainedModel.base_model``): statistics need
    no logits, and a large vocabulary's head would cost as much as several layers."""
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, nn.Module) else model


class _Accumulator:
    """The hooks' shared state: which function the current batch belongs to and its mask."""

    def __init__(self, functions: int, widths: Mapping[int, int], per_text: bool) -> None:
        layers = len(widths)
        width = next(iter(widths.values()))
        if any(w != width for w in widths.values()):
            raise InvalidBaseModel("FFN layers differ in width", [f"{dict(widths)}"])
        self.positions = {layer: i for i, layer in enumerate(widths)}
        self.tokens = torch.zeros(functions, dtype=torch.int64)
        self.positive = torch.zeros(functions, layers, width, dtype=torch.int64)
        self.abs_sum = torch.zeros(functions, layers, width, dtype=torch.float64)
        self.per_text = per_text
        self.text_means: list[Tensor] = []
        self.text_function: list[int] = []
        self.function = 0
        self.mask = torch.ones(0, 0)
        self.batch_means = torch.zeros(0)

    def start_batch(self, function: int, mask: Tensor) -> None:
        self.function = function
        self.mask = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
        self.tokens[function] += int(mask.sum())
        if self.per_text:
            self.batch_means = torch.zeros(mask.shape[0], self.positive.shape[1], self.positive.shape[2])

    def end_batch(self, mask: Tensor) -> None:
        if self.per_text:
            keep = mask.any(dim=1)  # an all-padding row is no text
            self.text_means.append(self.batch_means[keep])
            self.text_function.extend([self.function] * int(keep.sum()))

    def hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        position = self.positions[layer]

        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().to(torch.float32)  # [B, T, I]
            mask = self.mask.to(x.device)
            self.positive[self.function, position] += ((x > 0) * mask).sum(dim=(0, 1)).to(torch.int64).cpu()
            magnitude = x.abs().mul_(mask)
            sums = magnitude.sum(dim=1)  # [B, I]
            self.abs_sum[self.function, position] += sums.sum(dim=0).double().cpu()
            if self.per_text:
                self.batch_means[:, position] = (sums / mask.sum(dim=1).clamp_min(1)).cpu()

        return record


def collect_statistics(
    model: nn.Module,
    probes: Mapping[str, Iterable[ProbeBatch]],
    *,
    per_text: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> NeuronStatistics:
    """Stream every function's probe batches through ``model`` and count per-neuron activity.

    The model is run without its LM head, in inference mode; hooks are removed afterwards,
    also when ``progress`` raises (which is how a caller cancels).

    Args:
        model: a causal LM (or its backbone) with ``layers.N.mlp.down_proj`` or GPT-2 modules.
        probes: function name -> batches of token ids (one text per row, padded rows masked).
        per_text: keep each text's mean ``|activation|`` (needed by the AP method).
        progress: called after each batch with the function's name and the tokens seen so far.

    Returns:
        The statistics; their size does not depend on the number of tokens.
    """
    if not probes:
        raise InvalidParams("no probe sets given")
    projections = ffn_output_projections(model)
    state = _Accumulator(len(probes), {k: projection_width(m) for k, m in projections.items()}, per_text)
    handles = [module.register_forward_pre_hook(state.hook(layer)) for layer, module in projections.items()]
    runner = backbone(model)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for index, (name, batches) in enumerate(probes.items()):
                for batch in batches:
                    ids, mask = unpack_batch(batch)
                    state.start_batch(index, mask)
                    runner(input_ids=ids.to(device), attention_mask=mask.to(device, torch.int64))
                    state.end_batch(mask)
                    if progress is not None:
                        progress(name, int(state.tokens.sum()))
    finally:
        for handle in handles:
            handle.remove()
    empty = [name for name, count in zip(probes, state.tokens.tolist(), strict=True) if count == 0]
    if empty:
        raise InvalidParams("probe sets without tokens", empty)
    layers, width = state.positive.shape[1:]
    means = torch.cat(state.text_means) if state.text_means else torch.zeros(0, layers, width)
    return NeuronStatistics(
        functions=tuple(probes),
        layers=tuple(projections),
        tokens=state.tokens,
        positive=state.positive,
        abs_sum=state.abs_sum,
        text_mean_abs=means,
        text_function=torch.tensor(state.text_function, dtype=torch.int64),
    )
