"""Validate an uploaded adapter against its base model, before anything is stored.

Reads ``adapter_config.json`` and the safetensors header (bounded, never trusted), plans
the adapter as a one-brick composition on the base model's directory (`composer`'s planner:
every tensor mapped to a linear, Conv1D or embedding module, shapes against the per-module
rank, DoRA magnitudes, saved module copies), and scans the data for NaN/Inf. When the base's
directory is not there as registered, tensors are checked against the linear-module shapes
recorded at registration instead. Every problem is collected and reported in one error. The
LoRA semantics themselves live in `composer`, so the registry validates exactly what the
composer will merge.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer import (
    FLOAT_DTYPES,
    BrickSource,
    ComposeError,
    IncompatibleBricks,
    LoraSettings,
    SafetensorsHeader,
    find_mergeable_modules,
    find_nonfinite,
    map_adapter_tensors,
    parse_lora_config,
    pattern_budget,
    plan_composition,
    read_base_model,
    read_header,
    refuse_negligible_delta,
    sniff_format,
    split_lora_key,
)
from composer import InvalidAdapter as ComposerInvalidAdapter
from registry import domain
from registry.composer_errors import composer_problems
from registry.errors import UnsupportedMediaType

__all__ = ["AdapterSpec", "inspect_adapter"]

_MAX_REPORTED = 50


@dataclass(frozen=True)
class AdapterSpec:
    """A validated LoRA adapter: its settings and the base-model modules it adapts."""

    settings: LoraSettings
    modules: tuple[str, ...]

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Leaf names of the adapted modules (``q_proj``, ``v_proj``, ...), sorted."""
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in self.modules}))


def inspect_adapter(
    config_bytes: bytes,
    weights_path: Path,
    base: domain.BaseModel | None,
    *,
    max_header_bytes: int,
    problems: list[str],
    pattern_seconds: float = 2.0,
    twins: tuple[domain.BaseModel, ...] = (),
) -> AdapterSpec | None:
    """Validate an adapter (config bytes + weights file) against ``base``.

    Args:
        config_bytes: the raw ``adapter_config.json``.
        weights_path: the (staged) ``adapter_model.safetensors``.
        base: the base model the brick claims to adapt; None when it is unknown (the
            config and weights are then checked on their own, to report all problems).
        max_header_bytes: bound on the safetensors header.
        pattern_seconds: total time for matching the config's module patterns.
        problems: every problem found is appended here, prefixed with the part it is in.
        twins: other registered base models with ``base``'s fingerprint: a
            ``base_model_name_or_path`` naming one of them names a model the brick fits too.

    Returns:
        `AdapterSpec`, or None when a problem was found (or ``base`` is None).

    Raises:
        UnsupportedMediaType: the weights are not safetensors (a pickle, a zip, ...).
    """
    found: list[str] = []
    _refuse_other_formats(weights_path)
    settings = _settings(config_bytes, found)
    header = _header(weights_path, max_header_bytes, found)
    modules: tuple[str, ...] = ()
    if header is not None and base is not None:
        with pattern_budget(pattern_seconds), composer_problems(found, "adapter_config"):
            planned = _plan_on_base(config_bytes, weights_path, settings, base, found)
            modules = planned if planned is not None else _check_tensors(header, settings, base, found)
        if not found:
            bad = find_nonfinite(weights_path, header)
            found.extend(f"adapter_weights: tensor {name!r} contains NaN or Inf values" for name in bad)
        if not found and settings is not None and Path(base.path).is_dir():
            # An adapter saved before training (lora_B = 0) is valid but changes nothing. (It
            # is measured against the base's weights: a base whose directory is gone, or one in
            # object storage, is checked against its recorded shapes only.)
            with composer_problems(found, "adapter_weights"):
                refuse_negligible_delta(weights_path, Path(base.path), settings)
    if settings is not None and base is not None:
        _check_base_name(settings, base, twins, found)
    problems.extend(found[:_MAX_REPORTED])
    if found or settings is None or base is None:
        return None
    return AdapterSpec(settings=settings, modules=modules)


def _refuse_other_formats(weights_path: Path) -> None:
    with open(weights_path, "rb") as handle:
        prefix = handle.read(8)
    other = sniff_format(prefix)
    if other is not None:
        raise UnsupportedMediaType(
            f"adapter_weights is {other}, not safetensors",
            errors=[
                "adapter_weights: only safetensors is accepted (pickle files can run code when loaded); "
                "convert with `safetensors.torch.save_file(torch.load(path, weights_only=True), "
                "'adapter_model.safetensors')` or save with `save_pretrained(..., safe_serialization=True)`"
            ],
        )


def _settings(config_bytes: bytes, problems: list[str]) -> LoraSettings | None:
    try:
        data: Any = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        problems.append(f"adapter_config: not valid JSON ({reason})")
        return None
    with composer_problems(problems, "adapter_config"):
        return parse_lora_config(data)
    return None


def _header(weights_path: Path, max_header_bytes: int, problems: list[str]) -> SafetensorsHeader | None:
    with composer_problems(problems, "adapter_weights"):
        return read_header(weights_path, max_header_bytes=max_header_bytes)
    return None


_UPLOAD = "upload"


def _plan_on_base(
    config_bytes: bytes,
    weights_path: Path,
    settings: LoraSettings | None,
    base: domain.BaseModel,
    problems: list[str],
) -> tuple[str, ...] | None:
    """Plan the upload as a one-brick composition on the base model's own directory, so the
    registry refuses exactly what the composer would (DoRA magnitudes, saved module copies
    and ``base_layer`` weights, embedding LoRA, un-prefixed checkpoints, legacy per-expert
    MoE keys), before the brick is stored rather than when it is first composed.

    Returns the adapted modules (factor pairs and saved copies), or None when the base's
    directory is not there as registered (moved, or its files changed): the upload is then
    checked against the shapes recorded at registration (`_check_tensors`).
    """
    if settings is None:
        return None  # the config's own problems are reported; the weights get the stored-shape check
    try:
        layout = read_base_model(Path(base.path))
        if layout.fingerprint() != base.fingerprint:
            return None
    except (ComposeError, OSError):
        return None
    try:
        mergeable = find_mergeable_modules(layout)
    except ComposeError:
        return None
    if settings.target_modules is not None and not any(settings.targets(m) for m in mergeable):
        problems.append(
            f"adapter_config: target_modules {_show(settings.target_modules)} matches no linear module (nor "
            f"embedding) of base model {base.name!r}"
        )
    with tempfile.TemporaryDirectory(prefix="brickyard-spec-") as tmp:
        config_path = Path(tmp) / "adapter_config.json"
        config_path.write_bytes(config_bytes)
        try:
            plan = plan_composition(layout.path, [BrickSource(_UPLOAD, config_path, weights_path)])
        except (IncompatibleBricks, ComposerInvalidAdapter) as exc:
            problems.extend(_weights_problem(p) for p in exc.problems)
            return ()
    brick = plan.bricks[0]
    return tuple(sorted({*brick.modules, *brick.copies, *brick.parameters}))


def _weights_problem(problem: str) -> str:
    """The planner's ``"brick 'upload': ..."`` as an upload problem, ``"adapter_weights: ..."``."""
    return "adapter_weights: " + problem.removeprefix(f"brick {_UPLOAD!r}: ")


def _check_tensors(
    header: SafetensorsHeader, settings: LoraSettings | None, base: domain.BaseModel, problems: list[str]
) -> tuple[str, ...]:
    if settings is not None and settings.target_parameters:
        # Raw parameters (fused experts) are mapped through the base's own files, not its record.
        problems.append(
            f"adapter_config: target_parameters (LoRA on raw parameters, e.g. fused MoE experts) is checked against "
            f"the files of base model {base.name!r}, which are not readable as registered; restore its directory "
            "(or register it again) and upload the brick again"
        )
        return ()
    mapping = None
    with composer_problems(problems, "adapter_weights"):
        mapping = map_adapter_tensors(header.tensors)
    if mapping is None:
        # Keep checking the well-formed part, so that every problem is reported at once.
        pairs = [n for n in header.tensors if split_lora_key(n) is not None]
        try:
            mapping = map_adapter_tensors(pairs)
        except ComposerInvalidAdapter:
            return ()
    for module, (a_name, b_name) in mapping.modules.items():
        if len(problems) >= _MAX_REPORTED:
            break
        shape = base.linear_modules.get(module)
        if shape is None:
            problems.append(
                f"adapter_weights: module {module!r} is not a linear module of base model {base.name!r}"
                " (only linear layers can be adapted; embeddings, norms and tied heads cannot)"
            )
            continue
        a, b = header.tensors[a_name], header.tensors[b_name]
        for info in (a, b):
            if info.dtype not in FLOAT_DTYPES:
                problems.append(f"adapter_weights: tensor {info.name!r} has dtype {info.dtype}, not a float type")
        if settings is None:
            continue
        r = settings.rank_for(module)
        settings.alpha_for(module)  # evaluated here, under the budget, as every composition will
        want_a, want_b = (r, shape.in_features), (shape.out_features, r)
        if a.shape != want_a:
            problems.append(
                f"adapter_weights: {module}.lora_A has shape {list(a.shape)}, expected {list(want_a)} (rank x in)"
            )
        if b.shape != want_b:
            problems.append(
                f"adapter_weights: {module}.lora_B has shape {list(b.shape)}, expected {list(want_b)} (out x rank)"
            )
        if not settings.targets(module):
            problems.append(
                f"adapter_config: target_modules {_show(settings.target_modules)} does not select module "
                f"{module!r}, which the weights adapt"
            )
    if (
        settings is not None
        and settings.target_modules is not None
        and not any(settings.targets(m) for m in base.linear_modules)
    ):
        problems.append(
            f"adapter_config: target_modules {_show(settings.target_modules)} matches no linear module "
            f"of base model {base.name!r}"
        )
    return tuple(mapping.modules)


def _show(value: object) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_base_name(
    settings: LoraSettings, base: domain.BaseModel, twins: tuple[domain.BaseModel, ...], problems: list[str]
) -> None:
    claimed = settings.base_model_name_or_path
    if not claimed:
        return
    known: set[str] = set()
    for model in (base, *twins):
        known |= {model.name, model.path, os.path.basename(os.path.normpath(model.path)), *model.aliases}
        config_name = model.config.get("_name_or_path")
        if isinstance(config_name, str) and config_name:
            known.add(config_name)
    normalized = os.path.normpath(claimed) if claimed.startswith(("/", ".")) else claimed
    # PEFT records the path the model was trained from ("models/tiny-llama" when relative):
    # its last component names the model as well as a registered name or alias does.
    last = os.path.basename(os.path.normpath(claimed)) if not os.path.isabs(claimed) else None
    if claimed in known or normalized in known or last in known:
        return
    problems.append(
        f"adapter_config: base_model_name_or_path is {claimed!r} but the brick is registered for base model "
        f"{base.name!r} (path {base.path!r}); if they are the same model, register the base model with "
        f"that name as an alias"
    )
