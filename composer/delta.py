"""Does an adapter change its base model at all? The size of ``s * B @ A`` against ``W``.

PEFT initialises ``lora_B`` to zero, so an adapter saved before training is a valid file whose
delta is exactly zero; servers load and serve such adapters without a word (vLLM issues
#34186, #55193). `refuse_negligible_delta` finds them before a brick is stored.

The measure, per adapted module, is ``max |s B A| / RMS(W)``: the largest change the adapter
makes to one weight, relative to the typical weight of that module. An adapter is negligible
when that ratio is below `NEGLIGIBLE_DELTA` in every module. At 1e-6 a change is far below
the rounding step of the base's own dtype for a typical weight (bf16 keeps 8 significant bits,
a step of 2**-8 = 3.9e-3 relative; fp16 2**-11 = 4.9e-4; fp32 2**-24 = 6e-8 is finer, but a
change of one part per million moves a logit by far less than the noise of a bf16 forward),
while one Adam step at lr 1e-5 from ``B = 0`` already gives ratios around 1e-4.

Cheap first: per module an upper bound ``s * max_i |B_i| * max_j |A_j|`` (row norms of B,
column norms of A; Cauchy-Schwarz) needs no product and no base weight; only when the bound
is above the threshold is the exact ``max |s B A|`` computed (in row blocks) and the base
weight read, and the scan stops at the first module over the threshold. A trained adapter
costs one module's product; an all-zero one reads no base weight at all. Tensors are read
one at a time with ``safetensors.safe_open``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.adapter import LoraSettings, map_adapter_tensors
from composer.errors import InvalidAdapter

if TYPE_CHECKING:
    import torch

__all__ = [
    "NEGLIGIBLE_DELTA",
    "DeltaSize",
    "delta_bound",
    "max_abs_delta",
    "measure_delta",
    "refuse_negligible_delta",
    "rms",
]

NEGLIGIBLE_DELTA = 1e-6
# Rows of B per block of the exact product: a block is rows x in floats (4 MB at in = 4096).
_BLOCK_ROWS = 256


@dataclass(frozen=True)
class DeltaSize:
    """How much an adapter changes its base, as far as `measure_delta` had to look.

    ``ratio`` is ``max |s B A| / RMS(W)`` of ``module`` (the first module over the threshold,
    else the largest ratio found); ``exact`` says whether it was computed or is the upper
    bound (bounds are kept only when they already prove the delta negligible). ``all_zero``:
    every ``lora_B`` (or every ``lora_A``) is exactly 0. ``modules`` is how many modules the
    adapter adapts.
    """

    ratio: float
    module: str | None
    exact: bool
    all_zero: bool
    modules: int

    def negligible(self, threshold: float = NEGLIGIBLE_DELTA) -> bool:
        """Whether no module changes its base weight by ``threshold`` of its RMS or more."""
        return self.ratio < threshold


def delta_bound(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """An upper bound of ``max |scaling * B @ A|`` without the product.

    Each entry is ``s * <B_i, A_:j>``, so it is at most ``|s| * max_i ||B_i|| * max_j ||A_:j||``.

    Args:
        a: ``lora_A`` (rank x in).
        b: ``lora_B`` (out x rank).
        scaling: the LoRA scaling ``s``.
    """
    a32, b32 = a.float(), b.float()
    return abs(scaling) * float(b32.norm(dim=1).max()) * float(a32.norm(dim=0).max())


def max_abs_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, *, block_rows: int = _BLOCK_ROWS) -> float:
    """``max |scaling * B @ A|``, computed in float32 row blocks of B (never the whole matrix).

    Args:
        a: ``lora_A`` (rank x in).
        b: ``lora_B`` (out x rank).
        scaling: the LoRA scaling ``s``.
        block_rows: rows of the product per block.
    """
    a32 = a.float()
    largest = 0.0
    for start in range(0, b.shape[0], block_rows):
        block = b[start : start + block_rows].float() @ a32
        largest = max(largest, float(block.abs().max()))
    return abs(scaling) * largest


def rms(weight: torch.Tensor) -> float:
    """Root mean square of a tensor, accumulated in float64."""
    return math.sqrt(float(weight.double().square().mean()))


def measure_delta(
    adapter_path: Path,
    base_dir: Path,
    settings: LoraSettings,
    *,
    threshold: float = NEGLIGIBLE_DELTA,
    weight_names: Mapping[str, str] | None = None,
) -> DeltaSize:
    """Measure ``max |s B A| / RMS(W)`` over an adapter's modules, stopping at the first module
    over ``threshold``.

    Args:
        adapter_path: the adapter's ``adapter_model.safetensors``.
        base_dir: the base model directory (its weights are read only for modules whose bound
            is over the threshold).
        settings: the adapter's parsed config (ranks and alphas give the scalings).
        threshold: the ratio a module must reach for the adapter to count as a change.
        weight_names: module -> the base checkpoint's key of its weight, when it is not
            ``<module>.weight``.

    Returns:
        `DeltaSize`. An adapter with DoRA magnitudes or saved module copies changes more than
        ``B A``: it is reported as not negligible (ratio ``inf``) without reading anything.

    Raises:
        InvalidAdapter: the tensors are not a LoRA adapter (see `map_adapter_tensors`).
        InvalidBaseModel: the base model directory cannot be read.
    """
    from safetensors import safe_open

    with safe_open(str(adapter_path), framework="pt") as tensors:
        mapping = map_adapter_tensors(tensors.keys())
        count = len(mapping.modules)
        if mapping.magnitudes or mapping.copies:
            return DeltaSize(math.inf, None, exact=False, all_zero=False, modules=count)
        bounds: dict[str, float] = {}
        for module, (a_name, b_name) in mapping.modules.items():
            bounds[module] = delta_bound(
                tensors.get_tensor(a_name), tensors.get_tensor(b_name), settings.scaling_for(module)
            )
        if all(bound == 0.0 for bound in bounds.values()):
            return DeltaSize(0.0, None, exact=True, all_zero=True, modules=count)
        base = _BaseWeights(base_dir, weight_names or {})
        best = DeltaSize(0.0, None, exact=False, all_zero=False, modules=count)
        for module, bound in sorted(bounds.items(), key=lambda item: -item[1]):
            if bound == 0.0:
                break
            scale = base.rms(module)
            if scale is None or scale == 0.0:
                # A module whose base weight cannot be found or is all zero: any change to it counts.
                return DeltaSize(math.inf, module, exact=False, all_zero=False, modules=count)
            if bound / scale < threshold:
                if bound / scale > best.ratio:
                    best = DeltaSize(bound / scale, module, exact=False, all_zero=False, modules=count)
                continue
            a_name, b_name = mapping.modules[module]
            exact = max_abs_delta(tensors.get_tensor(a_name), tensors.get_tensor(b_name), settings.scaling_for(module))
            ratio = exact / scale
            if ratio >= threshold:
                return DeltaSize(ratio, module, exact=True, all_zero=False, modules=count)
            if ratio > best.ratio:
                best = DeltaSize(ratio, module, exact=True, all_zero=False, modules=count)
        return best


def refuse_negligible_delta(
    adapter_path: Path,
    base_dir: Path,
    settings: LoraSettings,
    *,
    threshold: float = NEGLIGIBLE_DELTA,
    weight_names: Mapping[str, str] | None = None,
) -> DeltaSize:
    """Raise `InvalidAdapter` when the adapter leaves its base unchanged (see `measure_delta`).

    Returns:
        The `DeltaSize` of an adapter that does change its base.

    Raises:
        InvalidAdapter: every ``lora_B`` is zero (an adapter saved before training), or no
            module changes a weight by ``threshold`` of its module's RMS.
    """
    size = measure_delta(adapter_path, base_dir, settings, threshold=threshold, weight_names=weight_names)
    if size.all_zero:
        raise InvalidAdapter(
            "the adapter changes nothing",
            [
                f"the adapter changes nothing: the delta s*B@A is exactly zero in all {size.modules} modules "
                "(lora_B is all zeros, PEFT's initialisation): was the adapter saved before training?"
            ],
        )
    if size.negligible(threshold):
        raise InvalidAdapter(
            "the adapter changes nothing",
            [
                "the adapter changes nothing: its delta is negligible against the base weights: "
                f"max |s*B@A| / RMS(W) is at most {size.ratio:.3g} (module {size.module!r}), "
                f"below the threshold {threshold:g}, in all "
                f"{size.modules} modules: was the adapter saved before training?"
            ],
        )
    return size


class _BaseWeights:
    """RMS of base weights, read one tensor at a time from the base's shards."""

    def __init__(self, base_dir: Path, weight_names: Mapping[str, str]) -> None:
        from composer.basemodel import read_base_model

        self._dir = Path(base_dir)
        self._layout = read_base_model(self._dir)
        self._names = weight_names

    def _key(self, module: str) -> str | None:
        candidates = [self._names.get(module), f"{module}.weight"]
        if "." in module:
            # A checkpoint saved without the model's base_model_prefix (a bare GPT2Model, OPTModel).
            candidates.append(f"{module.split('.', 1)[1]}.weight")
        return next((c for c in candidates if c is not None and c in self._layout.weight_map), None)

    def rms(self, module: str) -> float | None:
        from safetensors import safe_open

        key = self._key(module)
        if key is None:
            return None
        file = self._layout.weight_map[key]
        with safe_open(str(self._dir / file), framework="pt") as shard:
            tensor: Any = shard.get_tensor(key)
        return rms(tensor)
