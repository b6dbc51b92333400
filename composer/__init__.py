"""Brickyard's composer: merge LoRA bricks into a base model or into one adapter.

```python
from composer import BrickSource, compose
compose(base_dir, [BrickSource("sentiment@2", cfg, weights, 0.7), ...], out_dir, method="ties",
        params={"density": 0.5}, output="full")
```

The package knows nothing of databases or HTTP. Importing it (or listing the merge methods)
does not import torch; composing does.
"""

from composer._version import COMPOSER_VERSION
from composer.adapter import LoraSettings, map_adapter_tensors, parse_lora_config, split_lora_key
from composer.basemodel import TRANSFORMERS_LOCK, find_linear_modules, read_base_model
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
from composer.fit import FitResult, examples_hash, fit_weights
from composer.header import FLOAT_DTYPES, SafetensorsHeader, find_nonfinite, read_header, sniff_format
from composer.methods import MERGE_METHODS, MergeMethod, MethodInfo, get_method, list_methods
from composer.plan import BrickSource, CompositionPlan, plan_composition

__version__ = COMPOSER_VERSION

__all__ = [
    "COMPOSER_VERSION",
    "FLOAT_DTYPES",
    "MERGE_METHODS",
    "NEGLIGIBLE_DELTA",
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
    "NonFiniteResult",
    "PairScores",
    "SafetensorsHeader",
    "TruncationStats",
    "UnknownMethod",
    "WrittenFile",
    "__version__",
    "compose",
    "examples_hash",
    "find_linear_modules",
    "find_nonfinite",
    "fit_weights",
    "get_method",
    "list_methods",
    "map_adapter_tensors",
    "measure_delta",
    "parse_lora_config",
    "plan_composition",
    "read_base_model",
    "read_header",
    "refuse_negligible_delta",
    "score_brick",
    "sniff_format",
    "split_lora_key",
]
