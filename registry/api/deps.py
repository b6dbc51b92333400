"""Request dependencies, typed with ``Annotated`` so routes stay one-liners.

Authentication happens in `registry.api.guard` before any body is read; these
dependencies enforce the scope each route needs and hand the route its `Actor`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from registry.auth import Actor, require
from registry.service import Registry

__all__ = ["AdminActor", "ReadActor", "RegistryDep", "WriteActor", "get_registry"]


def get_registry(request: Request) -> Registry:
    """The application's `Registry` (built by `create_app`)."""
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def _actor(request: Request) -> Actor:
    actor: Actor = request.state.actor
    return actor


def read_actor(request: Request) -> Actor:
    """The caller, allowed to read (anyone when reads are open)."""
    actor = _actor(request)
    if get_registry(request).settings.auth.open_reads and actor.scope is None:
        return actor
    return require(actor, "read")


def write_actor(request: Request) -> Actor:
    """The caller, who must hold a ``write`` token."""
    return require(_actor(request), "write")


def admin_actor(request: Request) -> Actor:
    """The caller, who must hold an ``admin`` token."""
    return require(_actor(request), "admin")


ReadActor = Annotated[Actor, Depends(read_actor)]
WriteActor = Annotated[Actor, Depends(write_actor)]
AdminActor = Annotated[Actor, Depends(admin_actor)]
