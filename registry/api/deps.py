"""Request dependencies, typed with ``Annotated`` so routes stay one-liners."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from registry.service import Registry

__all__ = ["RegistryDep", "get_registry"]


def get_registry(request: Request) -> Registry:
    """The application's `Registry` (built by `create_app`)."""
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
