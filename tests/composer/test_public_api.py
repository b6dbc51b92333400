"""The package's public surface: what the registry imports."""

from __future__ import annotations

import inspect
from pathlib import Path

import composer
from composer import BrickSource, compose


def test_all_names_exist_and_include_the_registry_contract() -> None:
    for name in composer.__all__:
        assert hasattr(composer, name), name
    contract = {
        "BrickSource",
        "ComposeResult",
        "compose",
        "list_methods",
        "get_method",
        "MERGE_METHODS",
        "plan_composition",
        # what the registry's upload check, base-model registration and embedder use
        "LoraSettings",
        "parse_lora_config",
        "map_adapter_tensors",
        "split_lora_key",
        "FLOAT_DTYPES",
        "SafetensorsHeader",
        "read_header",
        "find_nonfinite",
        "sniff_format",
        "read_base_model",
        "find_linear_modules",
        "find_mergeable_modules",
        "ComposeError",
        "IncompatibleBricks",
        "TRANSFORMERS_LOCK",
        # emergent bricks: discovery (resolved lazily: they import torch) and neuron operations
        "SELECTION_METHODS",
        "NeuronFile",
        "NeuronOp",
        "collect_statistics",
        "select_neurons",
        "verify_neuron_sets",
        "save_neuron_set",
        "load_neuron_set",
        # the zero-delta refusal at registration, few-shot fitting in composition builds
        "NEGLIGIBLE_DELTA",
        "refuse_negligible_delta",
        "fit_weights",
        "examples_hash",
        "score_brick",
    }
    assert contract <= set(composer.__all__)


def test_compose_signature() -> None:
    parameters = inspect.signature(compose).parameters
    assert list(parameters)[:3] == ["base_dir", "bricks", "out_dir"]
    keyword_only = {n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == {
        "method",
        "params",
        "output",
        "rank",
        "recipe",
        "progress",
        "base_name_or_path",
        "card_base_model",
        "neurons",
    }
    assert parameters["method"].default == "linear" and parameters["output"].default == "full"


def test_brick_source_defaults_to_weight_one() -> None:
    brick = BrickSource("a@1", Path("c.json"), Path("w.safetensors"))
    assert brick.weight == 1.0


def test_importing_composer_does_not_import_torch_until_an_emergent_name_is_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys, composer; assert 'torch' not in sys.modules, 'eager'; "
        "composer.select_neurons; assert 'torch' in sys.modules, 'not resolved'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
