"""API tokens: create, list, revoke (admin scope)."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry.api.deps import AdminActor, RegistryDep
from registry.api.params import NamePath
from registry.api.schemas import TokenCreate, TokenCreated, TokenOut

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, registry: RegistryDep, actor: AdminActor) -> TokenCreated:
    """Create a token; its secret is in this answer only (it is stored hashed)."""
    token, info = registry.tokens.create(body.name, body.scope, actor=actor.name)
    return TokenCreated(token=token, **TokenOut.of(info).model_dump())


@router.get("")
def list_tokens(registry: RegistryDep, _: AdminActor) -> list[TokenOut]:
    """Every token (never the secrets)."""
    return [TokenOut.of(t) for t in registry.tokens.list()]


@router.delete("/{name}")
def revoke_token(name: NamePath, registry: RegistryDep, actor: AdminActor) -> TokenOut:
    """Revoke a token; it stops working immediately."""
    return TokenOut.of(registry.tokens.revoke(name, actor=actor.name))
