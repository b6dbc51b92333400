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
one at a time from the file at their header offsets, through numpy: registration runs in the
API server, which does not import torch (5-8 s, and hundreds of MB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from composer.adapter import LoraSettings, map_adapter_tensors
from composer.errors import InvalidAdapter
from composer.header import SafetensorsHeader, TensorInfo, read_header

if TYPE_CHECKING:
    import numpy as np

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
_NUMPY_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8"}
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


def delta_bound(a: np.ndarray, b: np.ndarray, scaling: float) -> float:
    """An upper bound of ``max |scaling * B @ A|`` without the product.

    Each entry is ``s * <B_i, A_:j>``, so it is at most ``|s| * max_i ||B_i|| * max_j ||A_:j||``.

    Args:
        a: ``lora_A`` (rank x in).
        b: ``lora_B`` (out x rank).
        scaling: the LoRA scaling ``s``.
    """
    import numpy as np

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return abs(scaling) * float(np.linalg.norm(b64, axis=1).max()) * float(np.linalg.norm(a64, axis=0).max())


def max_abs_delta(a: np.ndarray, b: np.ndarray, scaling: float, *, block_rows: int = _BLOCK_ROWS) -> float:
    """``max |scaling * B @ A|``, computed in float32 row blocks of B (never the whole matrix).

    Args:
        a: ``lora_A`` (rank x in).
        b: ``lora_B`` (out x rank).
        scaling: the LoRA scaling ``s``.
        block_rows: rows of the product per block.
    """
    import numpy as np

    a32 = a.astype(np.float32)
    largest = 0.0
    for start in range(0, b.shape[0], block_rows):
        block = b[start : start + block_rows].astype(np.float32) @ a32
        largest = max(largest, float(np.abs(block).max()))
    return abs(scaling) * largest


def rms(weight: np.ndarray, *, block_rows: int = _BLOCK_ROWS) -> float:
    """Root mean square of a tensor, accumulated in float64 (a block of rows at a time)."""
    import numpy as np

    rows = weight.reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.reshape(1, -1)
    total = 0.0
    for start in range(0, rows.shape[0], block_rows):
        block = rows[start : start + block_rows].astype(np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    return math.sqrt(total / max(weight.size, 1))


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
    header = read_header(adapter_path)
    mapping = map_adapter_tensors(header.tensors)
    count = len(mapping.modules)
    if mapping.magnitudes or mapping.copies:
        return DeltaSize(math.inf, None, exact=False, all_zero=False, modules=count)
    factors = {module: (header.tensors[a], header.tensors[b]) for module, (a, b) in mapping.modules.items()}
    if any(info.dtype not in _NUMPY_DTYPES for pair in factors.values() for info in pair):
        return DeltaSize(math.inf, None, exact=False, all_zero=False, modules=count)
    bounds: dict[str, float] = {}
    with open(adapter_path, "rb") as handle:
        for module, (a_info, b_info) in factors.items():
            a, b = read_array(handle, header, a_info), read_array(handle, header, b_info)
            bounds[module] = delta_bound(a, b, settings.scaling_for(module))
        if all(bound == 0.0 for bound in bounds.values()):
            return DeltaSize(0.0, None, exact=True, all_zero=True, modules=count)
        base = _BaseWeights(base_dir, weight_names or {})
        best = DeltaSize(0.0, None, exact=False, all_zero=False, modules=count)
        for module, bound in sorted(bounds.items(), key=lambda item: -item[1]):
            if bound == 0.0:
                break
            scale = base.rms(module)
            if scale is None or scale == 0.0:
                # A module whose base weight cannot be read or is all zero: any change to it counts.
                return DeltaSize(math.inf, module, exact=False, all_zero=False, modules=count)
            if bound / scale < threshold:
                if bound / scale > best.ratio:
                    best = DeltaSize(bound / scale, module, exact=False, all_zero=False, modules=count)
                continue
            a_info, b_info = factors[module]
            a, b = read_array(handle, header, a_info), read_array(handle, header, b_info)
            ratio = max_abs_delta(a, b, settings.scaling_for(module)) / scale
            if ratio >= threshold:
                return DeltaSize(ratio, module, exact=True, all_zero=False, modules=count)
            if ratio > best.ratio:
                best = DeltaSize(ratio, module, exact=True, all_zero=False, modules=count)
    return best


def read_array(handle: BinaryIO, header: SafetensorsHeader, info: TensorInfo) -> np.ndarray:
    """One float tensor of an open safetensors file as a float32 numpy array (bf16 widened
    by bits: numpy has no bfloat16).

    Raises:
        InvalidAdapter: a dtype other than F16, BF16, F32, F64.
    """
    import numpy as np

    if info.dtype not in _NUMPY_DTYPES:
        raise InvalidAdapter(f"tensor {info.name!r} has dtype {info.dtype}, not a float type", [])
    handle.seek(header.data_offset + info.start)
    raw = handle.read(info.nbytes)
    if info.dtype == "BF16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=_NUMPY_DTYPES[info.dtype]).astype(np.float32)
    return values.reshape(info.shape)


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
        key = self._key(module)
        if key is None:
            return None
        file, info = self._layout.tensor(key)
        if info.dtype not in _NUMPY_DTYPES:
            return None
        with open(self._dir / file, "rb") as handle:
            return rms(read_array(handle, self._layout.shards[file], info))
