"""The registry of merge methods: name -> `MergeMethod`. Importing it does not import torch."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from composer.errors import UnknownMethod
from composer.methods.base import MergeMethod
from composer.methods.dare import DARE_LINEAR, DARE_TIES
from composer.methods.linear import LINEAR
from composer.methods.magnitude_prune import MAGNITUDE_PRUNE
from composer.methods.ties import TIES

__all__ = ["MERGE_METHODS", "MethodInfo", "get_method", "list_methods"]

MERGE_METHODS: Mapping[str, MergeMethod] = MappingProxyType(
    {method.name: method for method in (LINEAR, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE)}
)


class MethodInfo(NamedTuple):
    """What `GET /v1/merge-methods` shows for one method."""

    name: str
    description: str
    params_schema: dict[str, Any]


def get_method(name: str) -> MergeMethod:
    """The merge method called ``name``.

    Raises:
        UnknownMethod: naming the known methods.
    """
    method = MERGE_METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise UnknownMethod(f"unknown merge method {name!r}", [f"known methods: {', '.join(MERGE_METHODS)}"])
    return method


def list_methods() -> list[MethodInfo]:
    """Every registered method as (name, description, JSON schema of its parameters)."""
    return [MethodInfo(m.name, m.description, m.params_schema()) for m in MERGE_METHODS.values()]
