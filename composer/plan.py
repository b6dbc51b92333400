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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from composer.adapter import LoraSettings, map_adapter_tensors, parse_lora_config
from composer.basemodel import BaseModelLayout, LinearModule, find_mergeable_modules, read_base_model
from composer.errors import IncompatibleBricks, InvalidAdapter, InvalidParams, InvalidTensorFile
from composer.experts import (
    ExpertSite,
    ExpertView,
    RawParameter,
    adapter_module_name,
    find_raw_parameters,
    selects_parameter,
)
from composer.files import open_regular
from composer.header import FLOAT_DTYPES, SafetensorsHeader, TensorInfo, read_header
from composer.methods import MergeMethod, MethodParams, get_method
from composer.neurons import EMPTY, NeuronOp, NeuronPlan, plan_neuron_ops

__all__ = [
    "OUTPUT_KINDS",
    "BrickPlan",
    "BrickSource",
    "CompositionPlan",
    "Contribution",
    "ModulePlan",
    "OutputKind",
    "ParameterPlan",
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
    """A validated brick: its LoRA settings, weights header, ``{module: (A, B)}`` entries,
    DoRA magnitudes, saved module copies and saved base-layer weights (to be checked)."""

    source: BrickSource
    settings: LoraSettings
    header: SafetensorsHeader
    modules: Mapping[str, tuple[TensorInfo, TensorInfo]]
    task_type: str | None = None
    magnitudes: Mapping[str, TensorInfo] = field(default_factory=dict)
    copies: Mapping[str, TensorInfo] = field(default_factory=dict)
    base_layers: Mapping[str, TensorInfo] = field(default_factory=dict)
    bias_copies: Mapping[str, TensorInfo] = field(default_factory=dict)
    # target_parameters: ``<module>.<parameter>`` -> the ParamWrapper's whole (lora_A, lora_B).
    parameters: Mapping[str, tuple[TensorInfo, TensorInfo]] = field(default_factory=dict)


@dataclass(frozen=True)
class Contribution:
    """Brick ``brick`` (index into `CompositionPlan.bricks`) on one module: its factor
    entries, rank, LoRA scaling ``s`` and recipe weight ``w``.

    A DoRA module also has its ``magnitude`` vector (its delta then depends on the base
    weight); a saved module copy (``modules_to_save``) has ``copy`` and no factors (its
    delta is ``W_saved - W``)."""

    brick: int
    a: TensorInfo | None
    b: TensorInfo | None
    rank: int
    scaling: float
    weight: float
    magnitude: TensorInfo | None = None
    copy: TensorInfo | None = None
    # A ParamWrapper's factors (``a``, ``b``) of which this stored tensor takes one expert's
    # slice (`composer.experts`); ``rank`` is then the per-expert rank.
    view: ExpertView | None = None

    @property
    def low_rank(self) -> bool:
        """Whether the delta is ``s * B @ A`` alone (not DoRA, not a copy)."""
        return self.magnitude is None and self.copy is None


@dataclass(frozen=True)
class ModulePlan:
    """A base module that at least one brick targets, and where its weight is stored."""

    module: LinearModule
    shard: str
    tensor: TensorInfo
    contributions: tuple[Contribution, ...]
    # (brick, tensor): a saved copy of this module's base weight (PEFT's ``base_layer.weight``),
    # which must equal the base's own weight.
    checks: tuple[tuple[int, TensorInfo], ...] = ()
    # "bias" for the bias of a saved module copy (``module.weight_name`` is then the bias).
    parameter: str = "weight"

    @property
    def key(self) -> str:
        """The key in `CompositionPlan.modules`: the module name, plus ``.bias`` for a bias."""
        return self.name if self.parameter == "weight" else f"{self.name}.{self.parameter}"

    @property
    def low_rank(self) -> bool:
        """Whether every contribution is a plain ``s * B @ A`` (no DoRA, no copy)."""
        return all(c.low_rank for c in self.contributions)

    @property
    def name(self) -> str:
        """The module name, e.g. ``model.layers.0.self_attn.q_proj``."""
        return self.module.name


@dataclass(frozen=True)
class ParameterPlan:
    """A raw parameter some brick targets (``target_parameters``) and each brick's whole
    ParamWrapper factors on it (``rank`` per expert); an adapter output writes these."""

    parameter: RawParameter
    contributions: tuple[Contribution, ...]


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
    neurons: NeuronPlan = EMPTY
    parameters: Mapping[str, ParameterPlan] = field(default_factory=dict)
    # How the outputs name the base model: ``base_model_name_or_path`` of an adapter output
    # (what PEFT loads it from) and ``base_model`` of the model card; None: the bricks' common
    # ``base_model_name_or_path``, else the base directory.
    base_name_or_path: str | None = None
    card_base_model: str | None = None

    @property
    def output_base_name(self) -> str:
        """The base model as an adapter output names it, so PEFT can load it."""
        if self.base_name_or_path:
            return self.base_name_or_path
        bases = {brick.settings.base_model_name_or_path for brick in self.bricks}
        common = bases.pop() if len(bases) == 1 else None
        return common or str(self.base.path)

    @property
    def card_base_name(self) -> str:
        """The base model as the model card's ``base_model`` names it."""
        return self.card_base_model or self.output_base_name

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
    neurons: Sequence[NeuronOp] = (),
) -> CompositionPlan:
    """Validate a recipe without reading any tensor data (but the small neuron files).

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
        neurons: operations with neuron sets (`composer.neurons`), in recipe order.

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
    linear = find_mergeable_modules(layout)
    neuron_problems: list[str] = []
    neuron_plan = plan_neuron_ops(neurons, linear, bricks=len(bricks), output=output, problems=neuron_problems)
    if neuron_problems:
        raise InvalidParams("invalid neuron operations", neuron_problems[:_MAX_PROBLEMS])
    invalid: list[str] = []
    incompatible: list[str] = []
    planned: list[BrickPlan] = []
    for brick in bricks:
        found = _plan_brick(brick, layout, linear, invalid, incompatible)
        if found is not None:
            planned.append(found)
    for index in neuron_plan.restrictions:
        brick_plan = planned[index] if index < len(planned) else None
        if brick_plan is not None and (
            brick_plan.magnitudes or brick_plan.copies or brick_plan.bias_copies or brick_plan.parameters
        ):
            incompatible.append(
                f"brick {brick_plan.source.name!r} has DoRA magnitudes, saved module copies or target_parameters: "
                "only a plain LoRA on modules can be restricted to neurons (by masking its factors)"
            )
    if output == "adapter" and rank is None:
        for brick_plan in planned:
            if brick_plan.magnitudes:
                incompatible.append(
                    f"brick {brick_plan.source.name!r} uses DoRA: its delta rescales the base weight row by row, "
                    "so it is not low-rank and an adapter output needs rank=k (a truncated SVD of the merged delta, "
                    "its error reported); or compose output='full', which is exact"
                )
    if output == "adapter" and (rank is not None or not merge_method.sums_deltas):
        for brick_plan in planned:
            if brick_plan.parameters:
                why = f"rank={rank}" if rank is not None else f"method {method!r} does not sum deltas"
                incompatible.append(
                    f"brick {brick_plan.source.name!r} adapts raw parameters (target_parameters, e.g. "
                    f"{next(iter(brick_plan.parameters))!r}): an adapter output carries them as PEFT ParamWrapper "
                    f"factors, exactly only as the concatenation of the bricks' factors, and {why} asks for more; "
                    "compose output='full' (exact), or method 'linear' without rank"
                )
    if incompatible:
        raise IncompatibleBricks("bricks do not fit the base model", (incompatible + invalid)[:_MAX_PROBLEMS])
    if invalid:
        raise InvalidAdapter("cannot read bricks", invalid[:_MAX_PROBLEMS])

    contributions: dict[str, list[Contribution]] = {}
    checks: dict[str, list[tuple[int, TensorInfo]]] = {}
    parameter_contributions: dict[str, list[Contribution]] = {}
    raw_parameters = find_raw_parameters(layout) if any(b.parameters for b in planned) else {}
    for index, brick_plan in enumerate(planned):
        weight = float(brick_plan.source.weight)
        for module, (a, b) in brick_plan.modules.items():
            contributions.setdefault(module, []).append(
                Contribution(
                    brick=index,
                    a=a,
                    b=b,
                    rank=a.shape[0],
                    scaling=brick_plan.settings.scaling_for(module),
                    weight=weight,
                    magnitude=brick_plan.magnitudes.get(module),
                )
            )
        for module, info in brick_plan.copies.items():
            contributions.setdefault(module, []).append(
                Contribution(brick=index, a=None, b=None, rank=0, scaling=1.0, weight=weight, copy=info)
            )
        for module, info in brick_plan.base_layers.items():
            checks.setdefault(module, []).append((index, info))
        for name, (a, b) in brick_plan.parameters.items():
            raw = raw_parameters[name]
            contribution = Contribution(
                brick=index,
                a=a,
                b=b,
                rank=a.shape[0] // raw.experts,
                scaling=brick_plan.settings.scaling_for(name),
                weight=weight,
            )
            parameter_contributions.setdefault(name, []).append(contribution)
            if output == "adapter":
                continue  # written back as ParamWrapper factors, not per stored tensor
            for site in raw.sites:
                stored = _site_module(site)
                linear.setdefault(stored.name, stored)
                contributions.setdefault(stored.name, []).append(replace(contribution, view=site.view))
        for module, info in brick_plan.bias_copies.items():
            contributions.setdefault(f"{module}.bias", []).append(
                Contribution(brick=index, a=None, b=None, rank=0, scaling=1.0, weight=weight, copy=info)
            )
    module_plans = []
    # A scaled down_proj is rewritten even when no brick targets it.
    for key in sorted(set(contributions) | set(checks) | set(neuron_plan.scales)):
        parameter = "weight"
        target = linear.get(key)
        if target is None:  # "<module>.bias": the bias of a saved copy, a plain tensor
            module, parameter = key.rsplit(".", 1)
            target = replace(linear[module], stored_name=_bias_name(linear[module]), fan_in_fan_out=False)
        shard, tensor = layout.tensor(target.weight_name)
        module_plans.append(
            ModulePlan(target, shard, tensor, tuple(contributions.get(key, ())), tuple(checks.get(key, ())), parameter)
        )
    shard_order = {file: position for position, file in enumerate(layout.shards)}
    module_plans.sort(key=lambda m: (shard_order[m.shard], m.tensor.start))
    return CompositionPlan(
        base=layout,
        bricks=tuple(planned),
        method=merge_method,
        params=method_params,
        output=output,  # type: ignore[arg-type]  # checked against OUTPUT_KINDS above
        rank=rank,
        modules={m.key: m for m in module_plans},
        neurons=neuron_plan,
        parameters={
            name: ParameterPlan(raw_parameters[name], tuple(found))
            for name, found in sorted(parameter_contributions.items())
        },
    )


def _site_module(site: ExpertSite) -> LinearModule:
    """The stored 2-D tensor of one expert slice, as a module a delta merges into."""
    name = site.key.removesuffix(".weight")
    rows, cols = site.shape
    if site.view.transposed:  # stored in x out, like a Conv1D weight
        return LinearModule(name, cols, rows, fan_in_fan_out=True, stored_name=site.key)
    return LinearModule(name, rows, cols, stored_name=site.key)


def _plan_brick(
    brick: BrickSource,
    layout: BaseModelLayout,
    linear: dict[str, LinearModule],
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
    parameters, consumed = _plan_parameters(label, settings, mapped.modules, header, layout, incompatible)
    modules: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for module, (a_name, b_name) in mapped.modules.items():
        if module in consumed:
            continue
        where = f"{label}: module {module!r}"
        a, b = header.tensors[a_name], header.tensors[b_name]
        target = linear.get(module) or _stored_linear(module, layout)
        if target is None:
            incompatible.append(f"{where}: {_why_not_linear(module, layout)}")
            continue
        linear[module] = target
        names = ("lora_embedding_A", "lora_embedding_B") if target.embedding else ("lora_A", "lora_B")
        ok = True
        if settings.target_modules is not None and not settings.targets(module):
            incompatible.append(
                f"{where}: the weights hold factors for it but target_modules does not select it "
                "(PEFT would silently ignore them)"
            )
            ok = False
        not_float = [f"{factor} is {info.dtype}" for info, factor in zip((a, b), names, strict=True)]
        not_float = [text for text, info in zip(not_float, (a, b), strict=True) if info.dtype not in FLOAT_DTYPES]
        if not_float:
            incompatible.append(f"{where}: {' and '.join(not_float)}, not a float type")
            ok = False
        rank = settings.rank_for(module)
        expected_a, expected_b = (rank, target.in_features), (target.out_features, rank)
        if a.shape != expected_a or b.shape != expected_b:
            incompatible.append(
                f"{where}: {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} do not fit "
                f"{target.out_features}x{target.in_features} at rank {rank} "
                f"(expected {names[0]} {list(expected_a)}, {names[1]} {list(expected_b)})"
            )
            ok = False
        ok = _check_base_dtype(where, layout, target, incompatible) and ok
        if ok:
            modules[module] = (a, b)
    magnitudes: dict[str, TensorInfo] = {}
    if mapped.magnitudes and not settings.use_dora:
        incompatible.append(
            f"{label}: the weights hold DoRA magnitude vectors for {len(mapped.magnitudes)} modules (first: "
            f"{next(iter(mapped.magnitudes))!r}) but use_dora is not set: set use_dora=true in adapter_config.json "
            "if it is a DoRA adapter"
        )
    for module, name in mapped.magnitudes.items():
        where = f"{label}: module {module!r}"
        info = header.tensors[name]
        if not settings.use_dora:
            continue
        if module in modules:
            target = linear[module]
            if info.shape != (target.out_features,) or info.dtype not in FLOAT_DTYPES:
                incompatible.append(
                    f"{where}: lora_magnitude_vector is {info.dtype} {list(info.shape)}, expected a float vector "
                    f"of {target.out_features} (one per output feature)"
                )
            else:
                magnitudes[module] = info
    without = [module for module in modules if settings.use_dora and module not in mapped.magnitudes]
    if without:
        incompatible.append(
            f"{label}: use_dora is set but the weights hold no lora_magnitude_vector for {len(without)} of its "
            f"modules (first: {without[0]!r}): the file is not a complete DoRA adapter; save it again with PEFT"
        )
    copies = _saved_weights(label, mapped.copies, header, layout, linear, incompatible, "a saved copy")
    base_layers = _saved_weights(
        label, mapped.base_layers, header, layout, linear, incompatible, "a saved base_layer.weight"
    )
    bias_copies: dict[str, TensorInfo] = {}
    for module, name in mapped.bias_copies.items():
        info, target = header.tensors[name], linear.get(module)
        if target is None or module not in copies:
            continue  # the module's weight copy is refused already
        base_bias = layout.weight_map.get(_bias_name(target))
        expected = layout.shards[base_bias].tensors[_bias_name(target)] if base_bias else None
        if expected is None or expected.shape != info.shape or info.dtype not in FLOAT_DTYPES:
            have = f"{list(expected.shape)}" if expected is not None else "none"
            incompatible.append(
                f"{label}: the saved bias of {module!r} is {info.dtype} {list(info.shape)}, the base model's bias "
                f"is {have}: it does not fit"
            )
            continue
        bias_copies[module] = info
    task_type = config_data.get("task_type") if isinstance(config_data, dict) else None
    return BrickPlan(
        source=brick,
        settings=settings,
        header=header,
        modules=modules,
        task_type=task_type if isinstance(task_type, str) else None,
        magnitudes=magnitudes,
        copies=copies,
        base_layers=base_layers,
        bias_copies=bias_copies,
        parameters=parameters,
    )


def _plan_parameters(
    label: str,
    settings: LoraSettings,
    factor_names: Mapping[str, tuple[str, str]],
    header: SafetensorsHeader,
    layout: BaseModelLayout,
    incompatible: list[str],
) -> tuple[dict[str, tuple[TensorInfo, TensorInfo]], set[str]]:
    """A brick's ParamWrapper factors (``target_parameters``), checked against the base's
    parameters (PEFT's shapes ``lora_A`` ``r*E x in``, ``lora_B`` ``out x r*E``) and against
    where the checkpoint stores them. Returns them by parameter name, and the adapter module
    names they occupy (PEFT's nested ``base_layer`` names)."""
    if not settings.target_parameters:
        return {}, set()
    raw = find_raw_parameters(layout)
    targeted = [p for p in raw.values() if selects_parameter(settings.target_parameters, p.name)]
    if not targeted:
        incompatible.append(
            f"{label}: target_parameters {list(settings.target_parameters)[:8]} select no parameter of the base "
            f"model ({layout.architecture}) outside its linear and embedding layers: target_parameters is for raw "
            "parameters such as fused MoE expert tensors; adapt linear layers with target_modules"
        )
        return {}, set()
    found: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    consumed: set[str] = set()
    # Problems shared by many parameters (every layer's experts) are reported once per brick.
    missing: list[tuple[str, str]] = []
    layouts: dict[str, list[str]] = {}
    for parameter in targeted:
        where = f"{label}: parameter {parameter.name!r}"
        module = adapter_module_name(parameter, targeted)
        consumed.add(module)
        names = factor_names.get(module)
        if names is None:
            missing.append((parameter.name, module))
            continue
        a, b = header.tensors[names[0]], header.tensors[names[1]]
        rank, experts = settings.rank_for(parameter.name), parameter.experts
        expected_a, expected_b = (rank * experts, parameter.in_features), (parameter.out_features, rank * experts)
        ok = True
        if a.shape != expected_a or b.shape != expected_b:
            incompatible.append(
                f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit {list(parameter.shape)} at "
                f"rank {rank} (expected lora_A {list(expected_a)}, lora_B {list(expected_b)}: PEFT's ParamWrapper "
                "holds rank x experts rows)"
            )
            ok = False
        bad = [f"{f} is {i.dtype}" for f, i in (("lora_A", a), ("lora_B", b)) if i.dtype not in FLOAT_DTYPES]
        if bad:
            incompatible.append(f"{where}: {' and '.join(bad)}, not a float type")
            ok = False
        if parameter.problem is not None:
            layouts.setdefault(parameter.problem, []).append(parameter.name)
            ok = False
        for site in parameter.sites:
            ok = _check_base_dtype(where, layout, _site_module(site), incompatible) and ok
        if ok:
            found[parameter.name] = (a, b)
    if missing:
        name, module = missing[0]
        incompatible.append(
            f"{label}: target_parameters selects {len(missing)} parameters whose factors the weights do not hold "
            f"(first: {name!r}, which PEFT saves as '{module}.lora_A/lora_B'): the file is not a complete adapter; "
            "save it again with PEFT"
        )
    for problem, unmapped in layouts.items():
        incompatible.append(
            f"{label}: target_parameters selects {len(unmapped)} parameters (first: {unmapped[0]!r}) that cannot take "
            f"a delta: {problem}"
        )
    return found, consumed


def _stored_linear(module: str, layout: BaseModelLayout) -> LinearModule | None:
    """A module the model built from the config does not have, but whose 2-D weight the
    checkpoint stores under ``<module>.weight`` (taken as ``out x in``, as ``nn.Linear``
    stores it; the factors' shapes are checked against it like any module's).

    The checkpoint's own names are the truth for where a delta lands: Mixtral checkpoints
    still store ``block_sparse_moe.experts.N.w1/w2/w3`` and ``block_sparse_moe.gate``
    (``nn.Linear`` layers when those adapters were trained), while transformers 5 builds
    fused 3-D expert tensors from them on load.
    """
    name = f"{module}.weight"
    file = layout.weight_map.get(name)
    if file is None:
        return None
    info = layout.shards[file].tensors[name]
    if len(info.shape) != 2:
        return None
    out_features, in_features = info.shape
    return LinearModule(module, int(out_features), int(in_features))


def _bias_name(target: LinearModule) -> str:
    return target.weight_name.removesuffix("weight") + "bias"


def _check_base_dtype(where: str, layout: BaseModelLayout, target: LinearModule, incompatible: list[str]) -> bool:
    base_dtype = layout.tensor(target.weight_name)[1].dtype
    if base_dtype not in FLOAT_DTYPES:
        incompatible.append(f"{where}: the base weight is {base_dtype}, which cannot take a float delta")
        return False
    return True


def _saved_weights(
    label: str,
    saved: Mapping[str, str],
    header: SafetensorsHeader,
    layout: BaseModelLayout,
    linear: Mapping[str, LinearModule],
    incompatible: list[str],
    what: str,
) -> dict[str, TensorInfo]:
    """Full weights a brick carries for base modules (``modules_to_save`` copies, or PEFT's
    ``base_layer.weight``), checked to have the base weight's shape and a float dtype."""
    found: dict[str, TensorInfo] = {}
    for module, name in saved.items():
        where = f"{label}: {what} of {module!r}"
        info = header.tensors[name]
        target = linear.get(module)
        if target is None:
            incompatible.append(f"{where}: {_why_not_linear(module, layout)}")
            continue
        base = layout.tensor(target.weight_name)[1]
        if info.shape != base.shape:
            rows = "the vocabulary was resized" if target.embedding or module.endswith(("lm_head", "embed_out")) else ""
            reason = (
                f"{rows}: the saved weight has {info.shape[0] if info.shape else 0} rows, the base {base.shape[0]}; "
                "compose on a base model saved with that vocabulary (resize_token_embeddings, then register it)"
                if rows and len(info.shape) == 2 and info.shape[1:] == base.shape[1:]
                else "the base model's layer has another shape"
            )
            incompatible.append(f"{where} is {list(info.shape)}, the base weight {list(base.shape)}: {reason}")
            continue
        if info.dtype not in FLOAT_DTYPES:
            incompatible.append(f"{where} is {info.dtype}, not a float type")
            continue
        if _check_base_dtype(where, layout, target, incompatible):
            found[module] = info
    return found


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
        return "the base model's module is not a linear layer (nor an embedding) a delta can merge into"
    if module.endswith("lm_head") or module.endswith("embed_out"):
        return (
            "the base model does not store this weight (it is tied to the embeddings), so it cannot be merged "
            "without changing the embeddings too; untie it in the base (tie_word_embeddings=false, lm_head saved) "
            "and register that"
        )
    return f"the base model ({layout.architecture}) has no such module"
