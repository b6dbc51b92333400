"""Download responses for blobs that are not local files: a stream from the blob store with
HTTP ``Range``, or a redirect to a presigned URL when the store offers one and the
settings allow it. (`registry.api.files.file_response` serves local files.)

Errors take the problem+json shape of every other error: a malformed ``Range`` is 400, a
range outside the blob 416. Several ranges are answered with the whole blob (200), which
RFC 9110 allows; clients that fetch pieces (Hugging Face's, browsers resuming) ask for one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from registry.api.files import file_response
from registry.errors import InvalidInput, RangeNotSatisfiable
from registry.storage.blob_check import StreamedBlobCheck, VerifiedBlobs
from registry.storage.blobs import BlobStore, LocalBlobStore

__all__ = ["RangedBlobs", "blob_response", "stored_file_response"]

_CHUNK = 1 << 20


class RangedBlobs(Protocol):
    """What a download needs from a blob store."""

    def open(self, sha256: str, start: int = 0, end: int | None = None) -> BinaryIO: ...
    def presigned_url(self, sha256: str, *, filename: str | None = None) -> str | None: ...


def blob_response(
    request: Request,
    blobs: RangedBlobs,
    *,
    sha256: str,
    size: int,
    media_type: str,
    filename: str,
    etag: str,
    redirect: bool = False,
    check: StreamedBlobCheck | None = None,
    what: str | None = None,
) -> Response:
    """The blob ``sha256`` of ``size`` bytes as a download: a 307 to a presigned URL when
    ``redirect`` is set and the store signs URLs, else streamed (206 for one ``Range``).
    With ``check``, the bytes are verified server-side (`registry.storage.blob_check`); a presigned
    redirect is checked for presence and size only (the client then reads the object store,
    which verifies its own checksums).

    Raises:
        InvalidInput: a malformed ``Range`` header.
        RangeNotSatisfiable: the range lies outside the blob.
        StorageCorrupt: the object is missing, of another size, or (a range) another sha256.
    """
    what = what or filename
    if redirect and (url := blobs.presigned_url(sha256, filename=filename)) is not None:
        if check is not None:
            check.before_response(sha256, size, what=what, whole=True)
        return RedirectResponse(url, status_code=307)
    headers = {
        "ETag": f'"{etag}"',
        "Cache-Control": "public, max-age=31536000, immutable",
        "Accept-Ranges": "bytes",
        "Content-Disposition": _attachment(filename),
    }
    start, end, status = 0, size, 200
    http_range = request.headers.get("range")
    if http_range is not None and size > 0:
        ranges = _parse_range(http_range, size)
        if len(ranges) == 1:
            (start, end), status = ranges[0], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    whole = start == 0 and end == size
    if check is not None:
        check.before_response(sha256, size, what=what, whole=whole or request.method == "HEAD")
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers, media_type=media_type)
    body = _stream(blobs, sha256, start, end)
    if check is not None and whole:
        body = check.stream(body, sha256, size, what=what)
    return StreamingResponse(body, status_code=status, headers=headers, media_type=media_type)


def stored_file_response(
    request: Request,
    blobs: BlobStore,
    *,
    sha256: str,
    size: int,
    media_type: str,
    filename: str,
    etag: str,
    redirect: bool = False,
    check: VerifiedBlobs | StreamedBlobCheck | None = None,
    what: str | None = None,
) -> Response:
    """The blob ``sha256`` as a download from whichever store holds it: a local directory's
    file is served by `file_response` (sendfile, several ranges as multipart), any other
    store's by `blob_response` (streamed, or a presigned redirect when ``redirect``).
    ``check`` (the registry's ``download_check``) verifies the bytes server-side, naming
    ``what`` (default: ``filename``) in the error and the log line."""
    what = what or filename
    if isinstance(blobs, LocalBlobStore):
        path = check.path(sha256, size, what=what) if isinstance(check, VerifiedBlobs) else blobs.local_path(sha256)
        return file_response(request, path, media_type=media_type, filename=filename, etag=etag)
    return blob_response(
        request,
        blobs,
        sha256=sha256,
        size=size,
        media_type=media_type,
        filename=filename,
        etag=etag,
        redirect=redirect,
        check=check if isinstance(check, StreamedBlobCheck) else None,
        what=what,
    )


def _parse_range(http_range: str, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` (end exclusive) of a ``Range`` header, parsed as Starlette
    parses it for local files, so both kinds of download accept the same headers."""
    from fastapi.responses import FileResponse
    from starlette.responses import MalformedRangeHeader
    from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

    try:
        return FileResponse._parse_range_header(http_range, size)
    except MalformedRangeHeader as exc:
        raise InvalidInput("malformed Range header", errors=[f"range: {exc.content}"]) from None
    except StarletteRangeNotSatisfiable:
        raise RangeNotSatisfiable(
            f"the range {http_range[:100]!r} lies outside the {size}-byte file", extra={"size_bytes": size}
        ) from None


def _stream(blobs: RangedBlobs, sha256: str, start: int, end: int) -> Iterator[bytes]:
    """The bytes ``[start, end)``, a chunk at a time (Starlette runs this in a worker thread;
    the store's connection is released when the client goes away)."""
    with blobs.open(sha256, start, end) as handle:
        remaining = end - start
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                raise OSError(f"blob {sha256} ended {remaining} bytes early")
            remaining -= len(chunk)
            yield chunk


def _attachment(filename: str) -> str:
    """A ``Content-Disposition`` as Starlette's `FileResponse` writes it."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'
