"""Brickyard's composer: merge LoRA bricks into a base model or into one adapter.

```python
from composer import BrickSource, compose
compose(base_dir, [BrickSource("sentiment@2", cfg, weights, 0.7), ...], out_dir, method="ties",
        params={"density": 0.5}, output="full")
```

The package knows nothing of databases or HTTP. Importing it (or listing the merge methods)
does not import torch; composing does.
"""

from typing import TYPE_CHECKING

from composer._version import COMPOSER_VERSION
from composer.adapter import (
    LoraSettings,
    map_adapter_tensors,
    parse_lora_config,
    pattern_budget,
    peft_pattern,
    split_lora_key,
)
from composer.basemodel import TRANSFORMERS_LOCK, find_linear_modules, find_mergeable_modules, read_base_model
from composer.compose import ComposeResult, TruncationStats, WrittenFile, compose
from composer.delta import NEGLIGIBLE_DELTA, DeltaSize, measure_delta, refuse_negligible_delta
from composer.errors import (
    ComposeError,
    IncompatibleBricks,
    InvalidAdapter,
    InvalidBaseModel,
    InvalidParams,
    InvalidTensorFile,
    NonFiniteResult,
    UnknownMethod,
)
from composer.evaluate import BrickQuality, PairScores, score_brick
from composer.files import HF_MODEL_FILES, NotRegularFile, open_regular, read_bounded
from composer.fit import FitResult, examples_hash, fit_weights
from composer.header import FLOAT_DTYPES, SafetensorsHeader, find_nonfinite, read_header, sniff_format
from composer.methods import MERGE_METHODS, MergeMethod, MethodInfo, get_method, list_methods
from composer.neurons import NEURON_OPS, NeuronOp
from composer.plan import BrickSource, CompositionPlan, plan_composition

__version__ = COMPOSER_VERSION

if TYPE_CHECKING:
    from composer.emergent import (
        SELECTION_METHODS,
        NeuronFile,
        collect_statistics,
        load_neuron_set,
        neuron_axis,
        save_neuron_set,
        select_neurons,
        verify_neuron_sets,
    )

# Emergent-brick names import torch: resolved on first use, so `import composer` stays torch-free.
_EMERGENT = (
    "SELECTION_METHODS",
    "NeuronFile",
    "collect_statistics",
    "load_neuron_set",
    "neuron_axis",
    "save_neuron_set",
    "select_neurons",
    "verify_neuron_sets",
)


def __getattr__(name: str) -> object:
    if name in _EMERGENT:
        import composer.emergent

        return getattr(composer.emergent, name)
    raise AttributeError(f"module 'composer' has no attribute {name!r}")


__all__ = [
    "COMPOSER_VERSION",
    "FLOAT_DTYPES",
    "HF_MODEL_FILES",
    "MERGE_METHODS",
    "NEGLIGIBLE_DELTA",
    "NEURON_OPS",
    "SELECTION_METHODS",
    "TRANSFORMERS_LOCK",
    "BrickQuality",
    "BrickSource",
    "ComposeError",
    "ComposeResult",
    "CompositionPlan",
    "DeltaSize",
    "FitResult",
    "IncompatibleBricks",
    "InvalidAdapter",
    "InvalidBaseModel",
    "InvalidParams",
    "InvalidTensorFile",
    "LoraSettings",
    "MergeMethod",
    "MethodInfo",
    "NeuronFile",
    "NeuronOp",
    "NonFiniteResult",
    "NotRegularFile",
    "PairScores",
    "SafetensorsHeader",
    "TruncationStats",
    "UnknownMethod",
    "WrittenFile",
    "__version__",
    "collect_statistics",
    "compose",
    "examples_hash",
    "find_linear_modules",
    "find_mergeable_modules",
    "find_nonfinite",
    "fit_weights",
    "get_method",
    "list_methods",
    "load_neuron_set",
    "map_adapter_tensors",
    "measure_delta",
    "neuron_axis",
    "open_regular",
    "parse_lora_config",
    "pattern_budget",
    "peft_pattern",
    "plan_composition",
    "read_base_model",
    "read_bounded",
    "read_header",
    "refuse_negligible_delta",
    "save_neuron_set",
    "score_brick",
    "select_neurons",
    "sniff_format",
    "split_lora_key",
    "verify_neuron_sets",
]
