"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from registry.api.deps import RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(registry: RegistryDep) -> dict[str, str]:
    """The database answers (503 problem otherwise)."""
    with registry.store.db.session() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ready", "database": registry.store.db.dialect}
