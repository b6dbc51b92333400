"""Emergent bricks: discover a base model's functional neuron sets (a background job)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from registry.api.deps import RegistryDep, WriteActor
from registry.api.params import NamePath
from registry.api.routes.compositions import queued
from registry.api.schemas import CompositionOut
from registry.emergent import DiscoveryRequest

router = APIRouter(prefix="/v1/base-models", tags=["emergent bricks"])


@router.post(
    "/{name}/emergent",
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": CompositionOut, "description": "already run: its bricks are registered"}},
)
def discover_emergent_bricks(
    name: NamePath,
    body: DiscoveryRequest,
    registry: RegistryDep,
    request: Request,
    response: Response,
    actor: WriteActor,
) -> CompositionOut:
    """Queue a discovery of each probe function's neurons; one emergent brick per function.

    The job runs on the composition workers: poll ``GET /v1/compositions/{id}`` for its
    status and progress; when ready, the bricks are listed with ``kind=emergent`` and each
    carries its verification table.
    """
    job, ready = registry.emergent.request_discovery(name, body, actor=actor.name)
    return queued(job, ready, request, response)
