"""The record and the model card of a composition: ``brickyard.json`` and ``README.md``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from composer._version import COMPOSER_VERSION

if TYPE_CHECKING:
    from composer.compose import TruncationStats
    from composer.plan import CompositionPlan

__all__ = ["RECORD_FORMAT", "composition_record", "model_card"]

RECORD_FORMAT = "brickyard.composition/1"

SEMANTICS = """\
For brick i with weight w_i and each module it targets, `delta_i = s_i * B_i @ A_i`, with
`s_i = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA), after `rank_pattern` and
`alpha_pattern`. The merge method combines the deltas of the bricks that target a module
(a brick that does not target it contributes nothing); merged weights are computed in
float32 and cast back to the base dtype."""


def composition_record(
    plan: CompositionPlan,
    *,
    recipe: Mapping[str, Any] | None,
    truncation: TruncationStats | None,
    ranks: Mapping[str, int],
) -> dict[str, Any]:
    """The ``brickyard.json`` document: the caller's recipe as given, and what the composer
    knows (method, validated params with defaults, bricks and weights, output, ranks, errors).
    """
    bricks = []
    for brick in plan.bricks:
        settings = brick.settings
        entry: dict[str, Any] = {
            "name": brick.source.name,
            "weight": float(brick.source.weight),
            "r": settings.r,
            "lora_alpha": settings.lora_alpha,
            "use_rslora": settings.use_rslora,
            "modules": len(brick.modules),
        }
        if settings.rank_pattern:
            entry["rank_pattern"] = dict(settings.rank_pattern)
        if settings.alpha_pattern:
            entry["alpha_pattern"] = dict(settings.alpha_pattern)
        bricks.append(entry)
    composer: dict[str, Any] = {
        "version": COMPOSER_VERSION,
        "method": plan.method.name,
        "params": plan.params.model_dump(mode="json"),
        "output": plan.output,
        "rank": plan.rank,
        "bricks": bricks,
        "base": {
            "architecture": plan.base.architecture,
            "dtype": plan.base.dtype,
            "parameters": plan.base.parameter_count,
            "fingerprint": plan.base.fingerprint(),
        },
        "modules_merged": len(plan.modules),
    }
    if plan.output == "adapter":
        composer["adapter_ranks"] = {"max": max(ranks.values(), default=0), "min": min(ranks.values(), default=0)}
        if truncation is not None:
            composer["truncation"] = truncation.as_dict()
    return {"format": RECORD_FORMAT, "recipe": dict(recipe) if recipe is not None else None, "composer": composer}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(plan: CompositionPlan, record: Mapping[str, Any]) -> str:
    """A README model card with YAML front matter, the recipe table and the merge semantics."""
    library = "transformers" if plan.output == "full" else "peft"
    front = ["---", f"library_name: {library}", f"base_model: {json.dumps(plan.card_base_name)}"]
    front += ["tags:", "- brickyard", "- lora", "- merge", f"- {plan.method.name}", "---", ""]
    params = record["composer"]["params"]
    shown = ", ".join(f"`{k}={v}`" for k, v in params.items()) or "none"
    kind = "a full model (base weights plus the merged delta)" if plan.output == "full" else "one LoRA adapter"
    lines = [
        "# Brickyard composition",
        "",
        f"Composed by Brickyard composer {COMPOSER_VERSION} into {kind} with the merge method "
        f"`{plan.method.name}` ({plan.method.description}). Parameters: {shown}.",
        "",
        "| brick | weight | rank | alpha | rsLoRA | modules |",
        "|---|---|---|---|---|---|",
    ]
    for brick in record["composer"]["bricks"]:
        lines.append(
            f"| {_cell(brick['name'])} | {brick['weight']:g} | {brick['r']} | {brick['lora_alpha']:g} "
            f"| {'yes' if brick['use_rslora'] else 'no'} | {brick['modules']} |"
        )
    lines += ["", f"Modules merged: {len(plan.modules)}. Base: {plan.base.architecture} ({plan.base.dtype})."]
    truncation = record["composer"].get("truncation")
    if plan.output == "adapter" and truncation is not None:
        lines += [
            "",
            f"Adapter rank: {plan.rank if plan.rank is not None else 'exact (sum of the bricks ranks)'}; relative "
            f"error against the exact merged delta: max {truncation['max_relative_error']:.3g}, "
            f"mean {truncation['mean_relative_error']:.3g}.",
        ]
    lines += ["", "## Merge semantics", "", SEMANTICS, "", "The full recipe is in `brickyard.json`.", ""]
    return "\n".join(front + lines)
