"""Names and aliases: a composition name points at a composition id; a brick alias
(``production``) points at a brick version. Both move when set again."""

from __future__ import annotations

from fastapi import APIRouter

from registry.api.deps import ReadActor, RegistryDep, WriteActor
from registry.api.params import NamePath
from registry.api.schemas import BrickAliasIn, BrickAliasOut, CompositionNameIn, CompositionOut

router = APIRouter(tags=["names and aliases"])


@router.get("/v1/bricks/{name}/aliases")
def list_brick_aliases(name: NamePath, registry: RegistryDep, _: ReadActor) -> list[BrickAliasOut]:
    """The aliases of a brick and the versions they point at."""
    return [BrickAliasOut.of(a) for a in registry.brick_aliases(name)]


@router.put("/v1/bricks/{name}/aliases/{alias}")
def set_brick_alias(
    name: NamePath, alias: NamePath, body: BrickAliasIn, registry: RegistryDep, actor: WriteActor
) -> BrickAliasOut:
    """Point ``name@alias`` at a version; ``alias`` is then accepted wherever a version is."""
    return BrickAliasOut.of(registry.set_brick_alias(name, body.version, alias, actor=actor.name))


@router.delete("/v1/bricks/{name}/aliases/{alias}")
def delete_brick_alias(name: NamePath, alias: NamePath, registry: RegistryDep, _: WriteActor) -> BrickAliasOut:
    """Remove an alias (the version stays)."""
    return BrickAliasOut.of(registry.remove_brick_alias(name, alias))


@router.put("/v1/composition-names/{name}")
def set_composition_name(
    name: NamePath, body: CompositionNameIn, registry: RegistryDep, actor: WriteActor
) -> CompositionOut:
    """Point a name at a composition; the name is then accepted wherever an id is."""
    return CompositionOut.of(registry.compositions.set_name(name, body.composition, actor=actor.name))


@router.delete("/v1/composition-names/{name}")
def delete_composition_name(name: NamePath, registry: RegistryDep, _: WriteActor) -> CompositionOut:
    """Remove a name (the composition stays); answers the composition it pointed at."""
    composition_id = registry.compositions.remove_name(name)
    return CompositionOut.of(registry.compositions.describe(composition_id))
