"""The merge methods the composer offers."""

from __future__ import annotations

from fastapi import APIRouter

from registry.api.deps import ReadActor
from registry.api.schemas import MergeMethodOut

router = APIRouter(prefix="/v1/merge-methods", tags=["compositions"])


@router.get("")
def list_merge_methods(_: ReadActor) -> list[MergeMethodOut]:
    """Every merge method with its parameters, defaults and a one-line description."""
    from composer import list_methods

    return [MergeMethodOut(name=m.name, description=m.description, params=m.params_schema) for m in list_methods()]
