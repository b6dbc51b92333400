"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from registry.api.deps import RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(registry: RegistryDep) -> dict[str, str]:
    """The database answers (503 problem otherwise)."""
    return {"status": "ready", "database": registry.check_database()}
