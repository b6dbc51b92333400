"""Compositions: request a composed model, watch it build, download it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from registry.api.blob_downloads import stored_file_response
from registry.api.deps import ReadActor, RegistryDep, WriteActor
from registry.api.files import (
    FILE_RESPONSES,
    file_response,
    tar_length,
    tar_of_streams,
    tar_of_streams_length,
    tar_stream,
)
from registry.api.params import CursorQuery, LimitQuery, NameQuery, RelativePath
from registry.api.schemas import CompositionFileOut, CompositionOut, Page
from registry.domain import Composition
from registry.inputs import ComposeRequest

router = APIRouter(prefix="/v1/compositions", tags=["compositions"])

IdPath = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="composition id (sha256 of its recipe) or a name pointing at one",
    ),
]
StatusQuery = Annotated[
    str | None, Query(pattern=r"^[a-z]{1,16}$", description="queued|running|ready|failed|cancelled")
]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": CompositionOut, "description": "already built: ready to download"}},
)
def request_composition(
    body: ComposeRequest, registry: RegistryDep, request: Request, response: Response, actor: WriteActor
) -> CompositionOut:
    """Resolve bricks (by name or by instruction) into a recipe and build it once.

    202 while queued or running (poll ``GET /v1/compositions/{id}``); 200 when the same
    recipe is already built. A failed build is retried.
    """
    composition, ready = registry.compositions.request(body, actor=actor.name)
    return queued(composition, ready, request, response)


def queued(job: Composition, ready: bool, request: Request, response: Response) -> CompositionOut:
    """The answer to a request for work on the composition workers (a build, a discovery):
    200 when it is already done, else 202 with this server's workers woken; its Location
    is the composition to poll."""
    if ready:
        response.status_code = status.HTTP_200_OK
    else:
        wake = getattr(request.app.state, "workers", None)
        if wake is not None:
            wake.wake()
    response.headers["Location"] = f"/v1/compositions/{job.id}"
    return CompositionOut.of(job)


@router.get("/{composition_id}")
def get_composition(composition_id: IdPath, registry: RegistryDep, _: ReadActor) -> CompositionOut:
    """Status, progress (0..1), error, recipe and names of a composition (by id or name)."""
    return CompositionOut.of(registry.compositions.describe(composition_id))


@router.get("")
def list_compositions(
    registry: RegistryDep,
    _: ReadActor,
    base_model: NameQuery = None,
    brick: NameQuery = None,
    status: StatusQuery = None,
    name: NameQuery = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Page[CompositionOut]:
    """Compositions, newest first, a page at a time; filtered by base model, brick (name),
    status and composition name."""
    base_id = registry.store.base_model_id(base_model) if base_model is not None else None
    page = registry.compositions.list_page(
        base_model_id=base_id, brick=brick, status=status, name=name, cursor=cursor, limit=limit
    )
    return Page[CompositionOut](items=[CompositionOut.of(c) for c in page.items], next_cursor=page.next_cursor)


@router.post("/{composition_id}/cancel")
def cancel_composition(composition_id: IdPath, registry: RegistryDep, actor: WriteActor) -> CompositionOut:
    """Cancel a queued or running build: it stops within about a second and leaves no
    files (409 when it is ready or failed already). Requesting it again rebuilds it."""
    return CompositionOut.of(registry.compositions.cancel(composition_id, actor=actor.name))


@router.delete("/{composition_id}")
def delete_composition(composition_id: IdPath, registry: RegistryDep, actor: WriteActor) -> CompositionOut:
    """Delete a composition (cancelling its build if it is queued or running) with its names
    and files; answers it as it was. Downloads already streaming a file finish."""
    return CompositionOut.of(registry.compositions.delete(composition_id, actor=actor.name))


@router.get("/{composition_id}/files")
def list_composition_files(composition_id: IdPath, registry: RegistryDep, _: ReadActor) -> list[CompositionFileOut]:
    """The files of a ready composition (409 while it is not ready)."""
    composition_id = registry.compositions.resolve_ref(composition_id)
    return [CompositionFileOut(path=p, size_bytes=n) for p, n in registry.compositions.files(composition_id)]


@router.get(
    "/{composition_id}/files/{path:path}",
    response_class=FileResponse,
    responses={**FILE_RESPONSES},
)
def get_composition_file(
    composition_id: IdPath,
    path: RelativePath,
    registry: RegistryDep,
    request: Request,
    _: ReadActor,
) -> Response:
    """One file of a ready composition (HTTP Range supported; from object storage, a 307 to
    a presigned URL when presigned downloads are enabled)."""
    composition_id = registry.compositions.resolve_ref(composition_id)
    # Held against eviction until the response is sent (long: a file response is not renewed).
    with registry.compositions.download_lease(composition_id, ttl_s=6 * 3600) as lease:
        stored = registry.compositions.published_file(composition_id, path)
        if stored is not None:
            response = stored_file_response(
                request,
                registry.blobs,
                sha256=stored.sha256,
                size=stored.size,
                media_type="application/json" if path.endswith(".json") else "application/octet-stream",
                filename=path.rsplit("/", 1)[-1],
                etag=f"{composition_id}:{path}",
                redirect=True,
                check=registry.download_check,
                what=f"composition {composition_id[:16]}/{path}",
            )
        else:
            local = registry.compositions.file(composition_id, path)
            media = "application/json" if local.suffix == ".json" else "application/octet-stream"
            response = file_response(
                request, local, media_type=media, filename=local.name, etag=f"{composition_id}:{path}"
            )
    response.background = BackgroundTask(lease.release)
    return response


# HEAD: size and ETag without the bytes; one operation in the schema, the GET.
router.add_api_route(
    "/{composition_id}/files/{path:path}",
    get_composition_file,
    methods=["HEAD"],
    include_in_schema=False,
)


@router.get(
    "/{composition_id}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
def get_composition_archive(composition_id: IdPath, registry: RegistryDep, _: ReadActor) -> StreamingResponse:
    """The whole composition as a tar stream (uncompressed: weights do not compress)."""
    composition_id = registry.compositions.resolve_ref(composition_id)
    with registry.compositions.download_lease(composition_id) as lease:  # eviction waits for the download
        files = registry.compositions.files(composition_id)
        if registry.compositions.published(composition_id) is not None:
            total = tar_of_streams_length(files)  # measured on the headers tar_of_streams will send
            body = tar_of_streams(files, lambda relative: registry.compositions.open_file(composition_id, relative))
        else:
            root = registry.compositions.directory(composition_id)
            relative = [p for p, _ in files]
            total = tar_length(root, relative)  # measured on the headers tar_stream will send
            body = tar_stream(root, relative)

    return StreamingResponse(
        lease.streaming(body),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="{composition_id}.tar"',
            "Content-Length": str(total),
        },
    )
