"""File responses with validated HTTP Range handling (errors as problem details)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from fastapi.responses import FileResponse

from registry.errors import InvalidInput, RangeNotSatisfiable

__all__ = ["FILE_RESPONSES", "file_response", "tar_length", "tar_stream"]

_FILE_TYPES: dict[str, dict[str, Any]] = {"application/octet-stream": {}, "application/json": {}}
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the file", "content": _FILE_TYPES},
    206: {
        "description": "part of the file (HTTP Range); several ranges come as multipart/byteranges",
        "content": {**_FILE_TYPES, "multipart/byteranges": {}},
    },
}


def file_response(request: Request, path: Path, *, media_type: str, filename: str, etag: str) -> FileResponse:
    """A `FileResponse` for ``path``; a bad ``Range`` header becomes a 400/416 problem.

    Starlette serves single and multiple byte ranges; this only checks the header first
    so that errors take the same problem+json shape as every other error.
    """
    size = path.stat().st_size
    http_range = request.headers.get("range")
    if http_range is not None:
        from starlette.responses import MalformedRangeHeader
        from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

        try:
            FileResponse._parse_range_header(http_range, size)
        except MalformedRangeHeader as exc:
            raise InvalidInput("malformed Range header", errors=[f"range: {exc.content}"]) from None
        except StarletteRangeNotSatisfiable:
            raise RangeNotSatisfiable(
                f"the range {http_range[:100]!r} lies outside the {size}-byte file", extra={"size_bytes": size}
            ) from None
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        headers={"ETag": f'"{etag}"', "Cache-Control": "public, max-age=31536000, immutable"},
    )


_BLOCK = 512
_CHUNK = 1 << 20


def _member_header(root: Path, relative: str) -> tuple[bytes, int]:
    """The tar header block(s) of one file and its size. Names over 100 characters,
    non-ASCII names and members of 8 GiB or more add PAX extended headers, so the header's
    length is only known from the bytes themselves."""
    import tarfile

    info = tarfile.TarInfo(relative)
    stat = (root / relative).stat()
    info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict"), info.size


def tar_length(root: Path, relative_paths: list[str]) -> int:
    """The exact byte length of `tar_stream` over the same files: the same headers are
    built and measured (the Content-Length of an archive download)."""
    total = 2 * _BLOCK
    for relative in relative_paths:
        header, size = _member_header(root, relative)
        total += len(header) + size + (-size % _BLOCK)
    return total


def tar_stream(root: Path, relative_paths: list[str]) -> Iterator[bytes]:
    """A POSIX (ustar/pax) tar of ``root``'s files, produced chunk by chunk: memory stays
    at one chunk whatever the size of the files."""
    for relative in relative_paths:
        path = root / relative
        header, size = _member_header(root, relative)
        yield header
        remaining = size
        with open(path, "rb") as handle:
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{path} shrank while being archived")
                remaining -= len(chunk)
                yield chunk
        padding = -size % _BLOCK
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * _BLOCK)


def _stream_member_header(relative: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(relative)
    info.size, info.mode = size, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_of_streams_length(files: list[tuple[str, int]]) -> int:
    """The exact byte length of `tar_of_streams` over the same files (same headers, measured)."""
    return 2 * _BLOCK + sum(len(_stream_member_header(r, n)) + n + (-n % _BLOCK) for r, n in files)


def tar_of_streams(files: list[tuple[str, int]], open_file: Callable[[str], BinaryIO]) -> Iterator[bytes]:
    """A POSIX (ustar/pax) tar of ``(relative path, size)`` files read through ``open_file``
    (files in object storage), chunk by chunk like `tar_stream`."""
    for relative, size in files:
        yield _stream_member_header(relative, size)
        remaining = size
        with open_file(relative) as handle:
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{relative} ended {remaining} bytes early while being archived")
                remaining -= len(chunk)
                yield chunk
        padding = -size % _BLOCK
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * _BLOCK)
