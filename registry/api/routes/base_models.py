"""Base models: register from a local directory, list, show."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from registry.api.deps import ReadActor, RegistryDep, WriteActor
from registry.api.offload import BlockingLane, run_blocking
from registry.api.params import NamePath
from registry.api.schemas import BaseModelDetail, BaseModelOut
from registry.inputs import BaseModelCreate

router = APIRouter(prefix="/v1/base-models", tags=["base models"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_base_model(
    body: BaseModelCreate, registry: RegistryDep, actor: WriteActor, request: Request
) -> BaseModelDetail:
    """Register a base model from a local Hugging Face directory on the server.

    Only ``config.json`` and the safetensors headers are read, never the weights. The
    reading runs on its own few threads under a deadline (``limits.fs_deadline_s``): a
    stuck file system answers 503 and cannot take the threads other requests need.
    """
    lane: BlockingLane = request.app.state.base_model_lane
    base = await run_blocking(
        lane, registry.settings.limits.fs_deadline_s, lambda: registry.add_base_model(body, actor=actor.name)
    )
    return BaseModelDetail.of(base)


@router.get("")
def list_base_models(registry: RegistryDep, _: ReadActor) -> list[BaseModelOut]:
    """Every registered base model."""
    return [BaseModelOut.of(b) for b in registry.list_base_models()]


@router.get("/{name}")
def get_base_model(name: NamePath, registry: RegistryDep, _: ReadActor) -> BaseModelDetail:
    """A base model with the shape of every linear module."""
    return BaseModelDetail.of(registry.get_base_model(name))
