"""Errors raised by the composer.

```
ComposeError                   anything the composer refuses or cannot do
├── InvalidTensorFile          a safetensors file that is malformed or unsafe to read
├── InvalidAdapter             an adapter config or weights that are not a supported LoRA
├── InvalidBaseModel           a base model directory that cannot be read
├── IncompatibleBricks         bricks that do not fit the base model or each other
├── UnknownMethod              a merge method name that is not registered
├── InvalidParams              merge parameters that fail validation
└── NonFiniteResult            a merge that produced NaN or Inf (names brick and module)
```

Every error carries ``problems``: the complete list of what is wrong, so a caller can show
them all at once instead of one per attempt. The composer knows nothing of HTTP; the
registry maps these classes to its own error hierarchy at the service boundary.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ComposeError",
    "IncompatibleBricks",
    "InvalidAdapter",
    "InvalidBaseModel",
    "InvalidParams",
    "InvalidTensorFile",
    "NonFiniteResult",
    "UnknownMethod",
]


class ComposeError(Exception):
    """Base class: ``message`` is a one-line summary, ``problems`` every detail."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        self.message = message
        self.problems = list(problems)
        super().__init__(message if not self.problems else f"{message}: " + "; ".join(self.problems))


class InvalidTensorFile(ComposeError):
    """A safetensors file is malformed, truncated, oversized or not safetensors at all."""


class InvalidAdapter(ComposeError):
    """An adapter config or its weights are not a LoRA adapter Brickyard can use."""


class InvalidBaseModel(ComposeError):
    """A base model directory is missing files or holds unreadable weights."""


class IncompatibleBricks(ComposeError):
    """Bricks do not fit the base model (modules, shapes) or cannot be combined."""


class UnknownMethod(ComposeError):
    """The merge method name is not in the registry of methods."""


class InvalidParams(ComposeError):
    """The parameters given for a merge method fail validation."""


class NonFiniteResult(ComposeError):
    """A merged tensor contains NaN or Inf; the message names the module and bricks."""
