"""Base models after registration: add and remove aliases, remove the registration."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from registry.api.deps import RegistryDep, WriteActor
from registry.api.params import NamePath
from registry.api.schemas import BaseModelDetail, BaseModelOut
from registry.inputs import BaseModelAliasIn

router = APIRouter(prefix="/v1/base-models", tags=["base models"])

# A Hub id has a slash ("meta-llama/Llama-3.2-1B"): the alias is the rest of the path.
AliasPath = Annotated[str, PathParam(min_length=1, max_length=300, description="an alias of the base model")]


@router.post("/{name}/aliases")
def add_base_model_alias(
    name: NamePath, body: BaseModelAliasIn, registry: RegistryDep, actor: WriteActor
) -> BaseModelDetail:
    """Add an alias: bricks whose ``base_model_name_or_path`` is the alias (or a path ending
    in it) register for this base model. Adding an existing alias changes nothing."""
    return BaseModelDetail.of(registry.add_base_model_alias(name, body.alias, actor=actor.name))


@router.delete("/{name}/aliases/{alias:path}")
def remove_base_model_alias(
    name: NamePath, alias: AliasPath, registry: RegistryDep, actor: WriteActor
) -> BaseModelDetail:
    """Remove an alias (404 when the base model has no such alias)."""
    return BaseModelDetail.of(registry.remove_base_model_alias(name, alias, actor=actor.name))


@router.delete("/{name}")
def delete_base_model(name: NamePath, registry: RegistryDep, actor: WriteActor) -> BaseModelOut:
    """Remove a base model's registration (its files stay); answers the removed base model.

    Refused (409 base-model-in-use) while bricks or compositions reference it, naming them.
    """
    return BaseModelOut.of(registry.delete_base_model(name, actor=actor.name))
