"""File responses with validated HTTP Range handling (errors as problem details)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse

from registry.errors import InvalidInput, RangeNotSatisfiable

__all__ = ["file_response"]


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
