"""Merge methods: pure functions over per-brick deltas, registered by name.

``MERGE_METHODS`` maps a name to a `MergeMethod` (description, pydantic params model,
combine function). Listing them does not import torch; the tensor code in
`composer.methods.ops` is imported when a method runs.
"""

from composer.methods.base import MergeContext, MergeMethod, MethodParams
from composer.methods.dare import DareLinearParams, DareTiesParams
from composer.methods.linear import LinearParams
from composer.methods.magnitude_prune import MagnitudePruneParams
from composer.methods.registry import MERGE_METHODS, MethodInfo, get_method, list_methods
from composer.methods.ties import TiesParams

__all__ = [
    "MERGE_METHODS",
    "DareLinearParams",
    "DareTiesParams",
    "LinearParams",
    "MagnitudePruneParams",
    "MergeContext",
    "MergeMethod",
    "MethodInfo",
    "MethodParams",
    "TiesParams",
    "get_method",
    "list_methods",
]
