"""Fail before you compute: check a recipe against the base model and the bricks using
only configs and safetensors headers, and return a `CompositionPlan`.

Every problem is collected and raised once: `UnknownMethod` for the method name,
`InvalidParams` for method parameters, output kind, rank, weights and recipe,
`InvalidBaseModel` for an unreadable base, and `IncompatibleBricks` (or `InvalidAdapter`
when the bricks are unreadable but nothing is incompatible) naming brick and module.
No tensor data is read here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from composer.adapter import LoraSettings, map_adapter_tensors, parse_lora_config
from composer.basemodel import BaseModelLayout, LinearModule, find_linear_modules, read_base_model
from composer.errors import IncompatibleBricks, InvalidAdapter, InvalidParams, InvalidTensorFile
from composer.files import open_regular
from composer.header import FLOAT_DTYPES, SafetensorsHeader, TensorInfo, read_header
from composer.methods import MergeMethod, MethodParams, get_method

__all__ = [
    "OUTPUT_KINDS",
    "BrickPlan",
    "BrickSource",
    "CompositionPlan",
    "Contribution",
    "ModulePlan",
    "OutputKind",
    "plan_composition",
]

OutputKind = Literal["full", "adapter"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("full", "adapter")
_MAX_CONFIG_BYTES = 1024 * 1024
_MAX_PROBLEMS = 100


@dataclass(frozen=True)
class BrickSource:
    """One brick of a recipe: where its files are and its weight in the merge.

    ``name`` labels the brick in errors, progress and the model card (e.g. ``"sentiment@2"``).
    The two files need not share a directory.
    """

    name: str
    config_path: Path
    weights_path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class BrickPlan:
    """A validated brick: its LoRA settings, weights header and ``{module: (A, B)}`` entries."""

    source: BrickSource
    settings: LoraSettings
    header: SafetensorsHeader
    modules: Mapping[str, tuple[TensorInfo, TensorInfo]]
    task_type: str | None = None


@dataclass(frozen=True)
class Contribution:
    """Brick ``brick`` (index into `CompositionPlan.bricks`) on one module: its factor
    entries, rank, LoRA scaling ``s`` and recipe weight ``w``."""

    brick: int
    a: TensorInfo
    b: TensorInfo
    rank: int
    scaling: float
    weight: float


@dataclass(frozen=True)
class ModulePlan:
    """A base module that at least one brick targets, and where its weight is stored."""

    module: LinearModule
    shard: str
    tensor: TensorInfo
    contributions: tuple[Contribution, ...]

    @property
    def name(self) -> str:
        """The module name, e.g. ``model.layers.0.self_attn.q_proj``."""
        return self.module.name


@dataclass(frozen=True)
class CompositionPlan:
    """Everything `compose` needs, validated; ``modules`` is in the base's storage order."""

    base: BaseModelLayout
    bricks: tuple[BrickPlan, ...]
    method: MergeMethod
    params: MethodParams
    output: OutputKind
    rank: int | None
    modules: Mapping[str, ModulePlan]

    def tensors_by_shard(self) -> dict[str, frozenset[str]]:
        """Names of the base tensors that receive a delta, grouped by shard file."""
        grouped: dict[str, set[str]] = {}
        for plan in self.modules.values():
            grouped.setdefault(plan.shard, set()).add(plan.tensor.name)
        return {shard: frozenset(names) for shard, names in grouped.items()}


def plan_composition(
    base_dir: Path,
    bricks: Sequence[BrickSource],
    *,
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    output: str = "full",
    rank: int | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> CompositionPlan:
    """Validate a recipe without reading any tensor data.

    Args:
        base_dir: the base model directory (config, index, safetensors shards).
        bricks: the bricks, in recipe order (order matters for seeded methods).
        method: a name in ``MERGE_METHODS``.
        params: the method's parameters (None: defaults).
        output: ``"full"`` (a merged model) or ``"adapter"`` (one LoRA adapter).
        rank: adapter output only: the rank to truncate to. Required for methods that do not
            sum deltas (their merged delta is not low-rank); for ``linear``, None means the
            exact concatenation (rank = sum of the bricks' ranks per module).
        recipe: caller's JSON to store with the result; checked to be serializable.

    Returns:
        The `CompositionPlan`.

    Raises:
        UnknownMethod, InvalidParams, InvalidBaseModel, IncompatibleBricks, InvalidAdapter.
    """
    merge_method = get_method(method)
    param_problems: list[str] = []
    try:
        method_params = merge_method.validate_params(params)
    except InvalidParams as exc:
        param_problems.extend(exc.problems)
    if output not in OUTPUT_KINDS:
        param_problems.append(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {output!r}")
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            param_problems.append(f"rank must be a positive integer, got {rank!r}")
        elif output == "full":
            param_problems.append("rank applies to adapter output only (a full merge is exact)")
    elif output == "adapter" and not merge_method.sums_deltas:
        param_problems.append(
            f"rank is required for adapter output with method {method!r}: its merged delta is not low-rank, "
            "so it is stored as a truncated SVD of that rank"
        )
    if not bricks:
        param_problems.append("a composition needs at least one brick")
    for index, brick in enumerate(bricks):
        weight = getattr(brick, "weight", None)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            param_problems.append(f"brick {index} ({getattr(brick, 'name', '?')!r}): weight must be a finite number")
    if recipe is not None:
        try:
            json.dumps(recipe, allow_nan=False)
        except (TypeError, ValueError) as exc:
            param_problems.append(f"recipe is not serializable as JSON: {exc}")
    if param_problems:
        raise InvalidParams(f"invalid composition request for method {method!r}", param_problems)

    layout = read_base_model(Path(base_dir))
    linear = find_linear_modules(layout)
    invalid: list[str] = []
    incompatible: list[str] = []
    planned: list[BrickPlan] = []
    for brick in bricks:
        found = _plan_brick(brick, layout, linear, invalid, incompatible)
        if found is not None:
            planned.append(found)
    if incompatible:
        raise IncompatibleBricks("bricks do not fit the base model", (incompatible + invalid)[:_MAX_PROBLEMS])
    if invalid:
        raise InvalidAdapter("cannot read bricks", invalid[:_MAX_PROBLEMS])

    contributions: dict[str, list[Contribution]] = {}
    for index, brick_plan in enumerate(planned):
        for module, (a, b) in brick_plan.modules.items():
            contributions.setdefault(module, []).append(
                Contribution(
                    brick=index,
                    a=a,
                    b=b,
                    rank=a.shape[0],
                    scaling=brick_plan.settings.scaling_for(module),
                    weight=float(brick_plan.source.weight),
                )
            )
    module_plans = []
    for module, parts in contributions.items():
        shard, tensor = layout.tensor(linear[module].weight_name)
        module_plans.append(ModulePlan(linear[module], shard, tensor, tuple(parts)))
    shard_order = {file: position for position, file in enumerate(layout.shards)}
    module_plans.sort(key=lambda m: (shard_order[m.shard], m.tensor.start))
    return CompositionPlan(
        base=layout,
        bricks=tuple(planned),
        method=merge_method,
        params=method_params,
        output=output,  # type: ignore[arg-type]  # checked against OUTPUT_KINDS above
        rank=rank,
        modules={m.name: m for m in module_plans},
    )


def _plan_brick(
    brick: BrickSource,
    layout: BaseModelLayout,
    linear: Mapping[str, LinearModule],
    invalid: list[str],
    incompatible: list[str],
) -> BrickPlan | None:
    label = f"brick {brick.name!r}"
    config_data = _read_config(Path(brick.config_path), label, invalid)
    settings: LoraSettings | None = None
    if config_data is not None:
        try:
            settings = parse_lora_config(config_data)
        except InvalidAdapter as exc:
            invalid.extend(f"{label}: {p}" for p in exc.problems)
    header: SafetensorsHeader | None = None
    try:
        header = read_header(Path(brick.weights_path))
    except FileNotFoundError:
        invalid.append(f"{label}: weights file {brick.weights_path} does not exist")
    except IsADirectoryError:
        invalid.append(f"{label}: weights path {brick.weights_path} is a directory")
    except InvalidTensorFile as exc:
        invalid.extend(f"{label}: {brick.weights_path.name}: {p}" for p in exc.problems)
    if settings is None or header is None:
        return None
    try:
        mapped = map_adapter_tensors(header.tensors)
    except InvalidAdapter as exc:
        invalid.extend(f"{label}: {p}" for p in exc.problems)
        return None
    modules: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for module, (a_name, b_name) in mapped.modules.items():
        where = f"{label}: module {module!r}"
        a, b = header.tensors[a_name], header.tensors[b_name]
        target = linear.get(module)
        if target is None:
            incompatible.append(f"{where}: {_why_not_linear(module, layout)}")
            continue
        ok = True
        if settings.target_modules is not None and not settings.targets(module):
            incompatible.append(
                f"{where}: the weights hold factors for it but target_modules does not select it "
                "(PEFT would silently ignore them)"
            )
            ok = False
        not_float = [f"{factor} is {info.dtype}" for info, factor in ((a, "lora_A"), (b, "lora_B"))]
        not_float = [text for text, info in zip(not_float, (a, b), strict=True) if info.dtype not in FLOAT_DTYPES]
        if not_float:
            incompatible.append(f"{where}: {' and '.join(not_float)}, not a float type")
            ok = False
        rank = settings.rank_for(module)
        expected_a, expected_b = (rank, target.in_features), (target.out_features, rank)
        if a.shape != expected_a or b.shape != expected_b:
            incompatible.append(
                f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                f"{target.out_features}x{target.in_features} at rank {rank} "
                f"(expected lora_A {list(expected_a)}, lora_B {list(expected_b)})"
            )
            ok = False
        base_dtype = layout.tensor(target.weight_name)[1].dtype
        if base_dtype not in FLOAT_DTYPES:
            incompatible.append(f"{where}: the base weight is {base_dtype}, which cannot take a float delta")
            ok = False
        if ok:
            modules[module] = (a, b)
    task_type = config_data.get("task_type") if isinstance(config_data, dict) else None
    return BrickPlan(
        source=brick,
        settings=settings,
        header=header,
        modules=modules,
        task_type=task_type if isinstance(task_type, str) else None,
    )


def _read_config(path: Path, label: str, problems: list[str]) -> Any:
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            raw = handle.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        problems.append(f"{label}: config file {path} does not exist")
        return None
    except IsADirectoryError:
        problems.append(f"{label}: config path {path} is a directory")
        return None
    if len(raw) > _MAX_CONFIG_BYTES:
        problems.append(f"{label}: adapter config is larger than {_MAX_CONFIG_BYTES} bytes")
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(f"{label}: adapter config is not valid JSON ({exc})")
        return None


def _why_not_linear(module: str, layout: BaseModelLayout) -> str:
    if f"{module}.weight" in layout.weight_map:
        return "the base model's module is not a linear layer LoRA can merge into"
    if module.endswith("lm_head") or module.endswith("embed_out"):
        return "the base model does not store this weight (it is tied to the embeddings), so it cannot be merged"
    return f"the base model ({layout.architecture}) has no such module"
