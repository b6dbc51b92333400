"""Path and query parameters shared by the routes, constrained in the OpenAPI schema so
that malformed values (NUL bytes, slashes, unicode look-alikes, 10 kB strings) are
refused with a 422 before they reach a database."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from registry.inputs import MAX_VERSION, NAME_PATTERN, TAG_PATTERN

__all__ = [
    "CursorQuery",
    "FilenamePath",
    "LimitQuery",
    "NamePath",
    "NameQuery",
    "RelativePath",
    "TagQuery",
    "VersionPath",
    "VersionRefPath",
]

NamePath = Annotated[str, Path(pattern=NAME_PATTERN, max_length=100, description="a name (brick, base model, token)")]
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="brick version")]
VersionRefPath = Annotated[
    str,
    Path(pattern=NAME_PATTERN, max_length=100, description="brick version number, or an alias (`production`)"),
]
FilenamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,200}$", description="file name")]
RelativePath = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,254}$", description="path of a file inside the composition")
]
NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=100)]
TagQuery = Annotated[str | None, Query(pattern=TAG_PATTERN, max_length=64)]
CursorQuery = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,512}$", description="next_cursor of a page")]
LimitQuery = Annotated[int, Query(ge=1, le=500)]
