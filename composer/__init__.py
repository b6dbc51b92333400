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
from composer.compose import ComposeResult, TruncationStats, WrittenFile, compose
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
from composer.methods import MERGE_METHODS, MergeMethod, MethodInfo, get_method, list_methods
from composer.plan import BrickSource, CompositionPlan, plan_composition

__version__ = COMPOSER_VERSION

__all__ = [
    "COMPOSER_VERSION",
    "MERGE_METHODS",
    "BrickSource",
    "ComposeError",
    "ComposeResult",
    "CompositionPlan",
    "IncompatibleBricks",
    "InvalidAdapter",
    "InvalidBaseModel",
    "InvalidParams",
    "InvalidTensorFile",
    "MergeMethod",
    "MethodInfo",
    "NonFiniteResult",
    "TruncationStats",
    "UnknownMethod",
    "WrittenFile",
    "__version__",
    "compose",
    "get_method",
    "list_methods",
    "plan_composition",
]
