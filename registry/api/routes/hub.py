"""Hugging Face Hub-compatible routes: what ``huggingface_hub``, ``transformers`` and
``peft`` call when ``HF_ENDPOINT`` points at Brickyard (mapping in `registry.hub`).

```
GET       /api/models                                   list (search, filter, author, limit)
GET       /api/models/{ns}/{name}[/revision/{rev}]      model info: sha, siblings, cardData
GET       /api/models/{ns}/{name}/tree/{rev}[/{path}]   file listing (snapshot_download)
GET|HEAD  /{ns}/{name}/resolve/{rev}/{path}             a file: X-Repo-Commit, ETag, Range
```

Errors are the usual problem details; a 404 also carries the Hub's ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``,
which ``huggingface_hub`` turns into its typed exceptions. A 401 without a token carries
``RepoNotFound`` as the Hub's does for a private repository; with a bad token, the Hub's
"Invalid credentials" message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute

from registry.api.blob_downloads import stored_file_response
from registry.api.deps import ReadActor, RegistryDep
from registry.api.files import file_response
from registry.errors import BrickyardError, InvalidInput, RangeNotSatisfiable, Unauthorized
from registry.hub import Hub, HubFile, Listing, RepoNotFound, Snapshot

__all__ = ["router"]

_BAD_CREDENTIALS = "Invalid credentials in Authorization header"  # the Hub's words, which its client matches


class _HubRoute(APIRoute):
    """Renders errors with the one problem handler, then adds the Hub's error headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except BrickyardError as exc:
                render = request.app.exception_handlers[BrickyardError]
                response = render(request, exc)
                if inspect.isawaitable(response):
                    response = await response
                code = getattr(exc, "hub_code", None)
                message = _header_text(exc.detail)
                if isinstance(exc, Unauthorized):
                    # As the Hub answers a private repository: without a token, 401 with
                    # RepoNotFound (huggingface_hub raises RepositoryNotFoundError, whose
                    # message says to authenticate); with a bad token, its exact message, which
                    # the client keeps as a plain HTTP error instead of "not found".
                    if request.headers.get("authorization"):
                        message = _BAD_CREDENTIALS
                    else:
                        code = RepoNotFound.hub_code
                if code is not None:
                    response.headers["X-Error-Code"] = code
                response.headers["X-Error-Message"] = message
                return response  # type: ignore[no-any-return]

        return route


# Not in Brickyard's OpenAPI document: the protocol is the Hub's, defined by its clients;
# tests/registry/api/test_hub.py checks it with those clients.
router = APIRouter(tags=["hugging face hub"], route_class=_HubRoute, include_in_schema=False)


def _hub(registry: RegistryDep) -> Hub:
    return Hub(registry, resolve_alias=registry.hub_alias)  # revision="production" works too


HubDep = Annotated[Hub, Depends(_hub)]


@router.get("/api/models")
def list_models(
    hub: HubDep,
    _: ReadActor,
    search: Annotated[str | None, Query(max_length=200)] = None,
    filter: Annotated[list[str] | None, Query(max_length=20)] = None,
    author: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    full: bool = False,
    cardData: bool = False,
) -> list[dict[str, Any]]:
    """Bricks, ready compositions and base models; ``filter=base_model:base-models/<name>``
    lists what was built on a base. ``full`` adds each repository's files and commit."""
    found = hub.list_models(search=search, filters=filter or (), author=author, limit=limit)
    models = []
    for listing in found:
        entry = _listing_json(listing)
        if cardData or full:
            entry["cardData"] = dict(listing.card)
        if full:
            snapshot = hub.snapshot(listing.repo_id)
            entry["sha"] = snapshot.commit
            entry["siblings"] = [{"rfilename": f.path} for f in snapshot.files]
        models.append(entry)
    return models


@router.get("/api/models/{namespace}/{name}")
def model_info(namespace: str, name: str, hub: HubDep, _: ReadActor) -> dict[str, Any]:
    """A repository at ``main``: commit (``sha``), files (``siblings``), model card data."""
    return _info_json(hub.snapshot(f"{namespace}/{name}"))


@router.get("/api/models/{namespace}/{name}/revision/{revision}")
def model_info_at(namespace: str, name: str, revision: str, hub: HubDep, _: ReadActor) -> dict[str, Any]:
    """A repository at a revision (a brick version, ``main`` or a commit id)."""
    return _info_json(hub.snapshot(f"{namespace}/{name}", revision))


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
def list_tree(namespace: str, name: str, revision: str, hub: HubDep, _: ReadActor) -> list[dict[str, Any]]:
    """Every file of a revision (the listing is always recursive: repositories are small)."""
    return _tree_json(hub.snapshot(f"{namespace}/{name}", revision), "")


@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
def list_tree_under(
    namespace: str, name: str, revision: str, path: str, hub: HubDep, _: ReadActor
) -> list[dict[str, Any]]:
    """The files of a revision under ``path``."""
    return _tree_json(hub.snapshot(f"{namespace}/{name}", revision), path.strip("/"))


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_file(
    namespace: str, name: str, revision: str, path: str, request: Request, hub: HubDep, _: ReadActor
) -> Response:
    """A file of a revision, with the headers the Hub sends: ``X-Repo-Commit``, ``ETag``
    (the sha256), ``X-Linked-Etag``/``X-Linked-Size`` for weights; HTTP Range supported."""
    snapshot = hub.snapshot(f"{namespace}/{name}", revision)
    file = snapshot.file(path)
    headers = {"X-Repo-Commit": snapshot.commit, "Accept-Ranges": "bytes"}
    if file.lfs:
        headers["X-Linked-Etag"] = f'"{file.sha256}"'
        headers["X-Linked-Size"] = str(file.size)
    response = _file_body(request, file, hub)
    response.headers.update(headers)
    return response


# -- rendering --------------------------------------------------------------------------


def _file_body(request: Request, file: HubFile, hub: Hub) -> Response:
    media = "application/json" if file.path.endswith(".json") else "application/octet-stream"
    if file.path.endswith(".md"):
        media = "text/markdown; charset=utf-8"
    if file.stored:
        return stored_file_response(
            request,
            hub.registry.blobs,
            sha256=file.sha256,
            size=file.size,
            media_type=media,
            filename=file.path.rsplit("/", 1)[-1],
            etag=file.sha256,
            redirect=True,
            check=hub.registry.download_check,
            what=file.path,
        )
    if file.local is not None:
        response: FileResponse = file_response(
            request, file.local, media_type=media, filename=file.path.rsplit("/", 1)[-1], etag=file.sha256
        )
        return response
    assert file.content is not None
    content, status, extra = file.content, 200, {}
    http_range = request.headers.get("range")
    if http_range is not None:
        start, end = _single_range(http_range, len(content))
        if start is not None:
            content, status = content[start : end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{file.size}"
    return Response(
        content if request.method != "HEAD" else b"",
        status_code=status,
        media_type=media,
        headers={
            "ETag": f'"{file.sha256}"',
            "Content-Length": str(len(content)),
            "Cache-Control": "public, max-age=31536000, immutable",
            **extra,
        },
    )


def _single_range(header: str, size: int) -> tuple[int | None, int]:
    """(first, last) byte of a single ``bytes=`` range; (None, 0) for several ranges, which
    a server may answer with the whole file (RFC 9110 14.2)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or not spec.strip():
        raise InvalidInput("malformed Range header", errors=[f"range: {header[:100]!r}"])
    if "," in spec:
        return None, 0
    first, sep, last = spec.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        raise InvalidInput("malformed Range header", errors=[f"range: {header[:100]!r}"]) from None
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"the range {header[:100]!r} lies outside the {size}-byte file")
    return start, end


def _header_text(text: str) -> str:
    """``text`` as one line of latin-1, which is what an HTTP header may carry."""
    return " ".join(text.split())[:500].encode("latin-1", "replace").decode("latin-1")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _listing_json(listing: Listing) -> dict[str, Any]:
    return {
        "_id": listing.repo_id,
        "id": listing.repo_id,
        "modelId": listing.repo_id,
        "author": listing.repo_id.split("/", 1)[0],
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "library_name": listing.library,
        "tags": list(listing.tags),
        "createdAt": _iso(listing.created_at),
        "lastModified": _iso(listing.last_modified),
        "description": listing.description,
    }


def _info_json(snapshot: Snapshot) -> dict[str, Any]:
    info = _listing_json(snapshot.listing)
    info["sha"] = snapshot.commit
    info["cardData"] = dict(snapshot.listing.card)
    info["siblings"] = [_sibling_json(f) for f in snapshot.files]
    info["usedStorage"] = sum(f.size for f in snapshot.files)
    if snapshot.config is not None:
        info["config"] = dict(snapshot.config)
    return info


def _sibling_json(file: HubFile) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": file.path, "size": file.size, "blobId": file.blob_id}
    if file.lfs:
        sibling["lfs"] = {"size": file.size, "sha256": file.sha256, "pointerSize": len(file.lfs_pointer)}
    return sibling


def _tree_json(snapshot: Snapshot, under: str) -> list[dict[str, Any]]:
    prefix = f"{under}/" if under else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for file in snapshot.files:
        if not file.path.startswith(prefix):
            continue
        parts = file.path[len(prefix) :].split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add(prefix + "/".join(parts[:depth]))
        entry: dict[str, Any] = {"type": "file", "path": file.path, "size": file.size, "oid": file.blob_id}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.lfs_pointer)}
        entries.append(entry)
    if under and not entries:
        snapshot.file(under)  # raises EntryNotFound
    entries += [{"type": "directory", "path": p, "oid": "0" * 40} for p in sorted(folders)]
    return entries
