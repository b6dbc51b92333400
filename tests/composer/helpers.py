"""Test helpers: independent reference math and PEFT oracles.

The references here do not use the composer's code: scalings are computed from the raw
``adapter_config.json`` with PEFT's documented pattern rule, factors are read with
safetensors, and merges come from PEFT itself.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from composer import BrickSource

PREFIX = "base_model.model."


def source(path: Path, weight: float = 1.0, name: str | None = None) -> BrickSource:
    """A BrickSource for a PEFT adapter directory."""
    return BrickSource(
        name=name or path.name,
        config_path=path / "adapter_config.json",
        weights_path=path / "adapter_model.safetensors",
        weight=weight,
    )


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in a directory."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def reference_deltas(adapter: Path, *, fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """``{module: s * B @ A}`` (float64, laid out like the base weight) from the raw files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = _pattern_value(config.get("rank_pattern") or {}, module) or config["r"]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module) or config["lora_alpha"]
        assert a.shape[0] == r, (module, a.shape, r)
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        delta = s * (b.double() @ a.double())
        deltas[module] = delta.T if fan_in_fan_out else delta
    return deltas


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    expected64 = expected.double()
    return float(torch.linalg.vector_norm(actual.double() - expected64) / torch.linalg.vector_norm(expected64))


@contextmanager
def quiet() -> Iterator[None]:
    """Silence PEFT's informational warnings (e.g. fan_in_fan_out notices) inside oracles."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def peft_merged(
    base: Path,
    adapters: Sequence[Path],
    weights: Sequence[float],
    combination_type: str,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """PEFT's result: load base + adapters, ``add_weighted_adapter``, ``merge_and_unload``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="b0")
        for index, adapter in enumerate(adapters[1:], start=1):
            peft_model.load_adapter(adapter, adapter_name=f"b{index}")
        names = [f"b{i}" for i in range(len(adapters))]
        peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type, **kwargs)
        peft_model.set_adapter("merged")
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def logits(model: Any, vocab: int = 384) -> torch.Tensor:
    """Logits of a fixed batch of token ids."""
    ids = torch.arange(0, 48).reshape(2, 24) % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits
