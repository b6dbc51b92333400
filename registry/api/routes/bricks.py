"""Bricks: register (multipart upload), list, show, download files, patch, delete."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from registry.api.blob_downloads import stored_file_response
from registry.api.deps import ReadActor, RegistryDep, WriteActor
from registry.api.files import FILE_RESPONSES
from registry.api.params import CursorQuery, FilenamePath, LimitQuery, NamePath, NameQuery, TagQuery, VersionRefPath
from registry.api.schemas import BrickFileOut, BrickOut, EventOut, Page
from registry.api.uploads import receive_brick_upload
from registry.inputs import BrickPatchIn
from registry.service import Registry

router = APIRouter(prefix="/v1/bricks", tags=["bricks"])


def _version(registry: Registry, name: str, ref: str) -> int:
    """A version path segment as a number: digits, an alias, or ``latest``."""
    version = registry.resolve_brick_ref(name, ref)
    return version if version is not None else registry.get_brick(name).version


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["metadata", "adapter_config", "adapter_weights"],
                    "properties": {
                        "metadata": {
                            "type": "string",
                            "description": "JSON: name, base_model, description, examples, tags, and optional "
                            "version, license, metrics",
                        },
                        "adapter_config": {
                            "type": "string",
                            "format": "binary",
                            "description": "adapter_config.json (PEFT LoRA)",
                        },
                        "adapter_weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "adapter_model.safetensors",
                        },
                    },
                }
            }
        },
    }
}


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=_UPLOAD_BODY)
async def register_brick(request: Request, registry: RegistryDep, actor: WriteActor) -> BrickOut:
    """Register a LoRA brick. Everything is validated before anything is stored; the weights
    are written once, from the request body into the blob store (registry.api.uploads)."""
    upload = await receive_brick_upload(request, registry.blobs, registry.settings.limits)
    try:
        brick = await run_in_threadpool(
            registry.register_brick, upload.metadata, upload.config, upload.weights, actor=actor.name
        )
    finally:
        await upload.close()
    return BrickOut.of(brick)


@router.get("")
def list_bricks(
    registry: RegistryDep,
    _: ReadActor,
    base_model: NameQuery = None,
    tag: TagQuery = None,
    all_versions: bool = False,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
    kind: Annotated[Literal["lora", "emergent"] | None, Query(description="only bricks of this kind")] = None,
) -> Page[BrickOut]:
    """Bricks by name (latest version of each unless ``all_versions``), a page at a time."""
    page = registry.list_bricks(
        base_model=base_model, tag=tag, all_versions=all_versions, cursor=cursor, limit=limit, kind=kind
    )
    return Page[BrickOut](items=[BrickOut.of(b) for b in page.items], next_cursor=page.next_cursor)


@router.get("/{name}")
def get_brick(name: NamePath, registry: RegistryDep, _: ReadActor) -> BrickOut:
    """The latest version of a brick."""
    return BrickOut.of(registry.get_brick(name))


@router.get("/{name}/versions")
def list_brick_versions(
    name: NamePath,
    registry: RegistryDep,
    _: ReadActor,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Page[BrickOut]:
    """Every version of a brick, newest first."""
    registry.get_brick(name)
    page = registry.list_bricks(all_versions=True, name=name, cursor=cursor, limit=limit)
    return Page[BrickOut](items=[BrickOut.of(b) for b in page.items], next_cursor=page.next_cursor)


@router.get("/{name}/versions/{version}")
def get_brick_version(name: NamePath, version: VersionRefPath, registry: RegistryDep, _: ReadActor) -> BrickOut:
    """One version of a brick."""
    number = _version(registry, name, version)
    return BrickOut.of(registry.get_brick(name, number))


@router.patch("/{name}/versions/{version}")
def patch_brick_version(
    name: NamePath, version: VersionRefPath, body: BrickPatchIn, registry: RegistryDep, actor: WriteActor
) -> BrickOut:
    """Change the description, examples or tags of a brick version."""
    number = _version(registry, name, version)
    return BrickOut.of(registry.update_brick(name, number, body, actor=actor.name))


@router.delete("/{name}/versions/{version}")
def delete_brick_version(
    name: NamePath, version: VersionRefPath, registry: RegistryDep, actor: WriteActor, request: Request
) -> BrickOut:
    """Delete a brick version; answers the deleted brick. Its number is never reused. The
    serving engine unloads it before the answer (`registry.serve.Gateway.brick_deleted`)."""
    number = _version(registry, name, version)
    brick = registry.delete_brick(name, number, actor=actor.name)
    gateway = getattr(request.app.state, "gateway", None)  # None: the app runs without its lifespan
    if gateway is not None:
        anyio.from_thread.run(gateway.brick_deleted, brick)
    return BrickOut.of(brick)


@router.get("/{name}/versions/{version}/files")
def list_brick_files(
    name: NamePath, version: VersionRefPath, registry: RegistryDep, _: ReadActor
) -> list[BrickFileOut]:
    """The stored files of a brick version."""
    number = _version(registry, name, version)
    return [
        BrickFileOut(filename=f.filename, sha256=f.sha256, size_bytes=f.size_bytes, media_type=f.media_type)
        for f in registry.brick_files(name, number)
    ]


@router.get(
    "/{name}/versions/{version}/files/{filename}",
    response_class=FileResponse,
    responses={**FILE_RESPONSES},
)
def get_brick_file(
    name: NamePath,
    version: VersionRefPath,
    filename: FilenamePath,
    request: Request,
    registry: RegistryDep,
    _: ReadActor,
) -> Response:
    """A stored file, byte-identical to the upload (HTTP Range supported; a 307 to the object
    store when presigned downloads are enabled)."""
    file = registry.brick_file(name, _version(registry, name, version), filename)
    return stored_file_response(
        request,
        registry.blobs,
        sha256=file.sha256,
        size=file.size_bytes,
        media_type=file.media_type,
        filename=file.filename,
        etag=file.sha256,
        redirect=True,
        check=registry.download_check,
        what=f"{name}@{version}/{file.filename}",
    )


# HEAD: size and ETag without the bytes (Starlette's FileResponse sends headers only); one
# operation in the schema, the GET.
router.add_api_route(
    "/{name}/versions/{version}/files/{filename}",
    get_brick_file,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=FileResponse,
)


@router.get("/{name}/history")
def brick_history(
    name: NamePath, registry: RegistryDep, _: ReadActor, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[EventOut]:
    """Who registered, changed or deleted versions of this brick, and when (newest first)."""
    return [EventOut.of(e) for e in registry.brick_history(name, limit=limit)]
