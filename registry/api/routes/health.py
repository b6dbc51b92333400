"""Liveness and readiness (see `registry.api.warm_up` for what waits for the embedding model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from registry.api.deps import RegistryDep
from registry.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(
    request: Request,
    registry: RegistryDep,
    embedder: Annotated[
        bool, Query(description="also wait for the search embedding model to be loaded (503 while it loads)")
    ] = False,
) -> dict[str, str]:
    """The database answers (503 problem otherwise); ``embedder`` reports the embedding
    model's warm-up: ``loading``, ``ready`` or ``unavailable``."""
    database = registry.check_database()
    warm_up = getattr(request.app.state, "warm_up", None)
    state = warm_up.state if warm_up is not None else "loading"
    if embedder and state == "loading":
        raise ServiceUnavailable("the embedding model is loading; searches would wait for it")
    return {"status": "ready", "database": database, "embedder": state}
