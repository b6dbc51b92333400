"""Composition outputs published to the blob store, for workers and API replicas on other
machines (issue #23).

A worker builds into a local directory as always; `publish_directory` then uploads every
file as a content-addressed blob (each commit verified: the stored object's checksum is the
sha256 computed here) and returns the manifest. Only after that does the composition store
flip the composition to ``ready``, in one transaction that records the manifest: a crash
midway leaves unreferenced blobs (collected by ``brickyard fsck``) and a composition that
is not ready, never a ready one with a missing file. The database is then the source of
truth: listings, downloads and eviction read the manifest, not a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.storage.blobs import BlobStore

__all__ = ["PublishedFile", "manifest_from_json", "manifest_to_json", "publish_directory"]

# Outputs are the composer's own files; the adapter upload limit does not apply to them.
_NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class PublishedFile:
    """A file of a composition: its path in the composition and the blob holding its bytes."""

    path: str
    sha256: str
    size: int


def publish_directory(blobs: BlobStore, root: Path) -> list[PublishedFile]:
    """Upload every regular file under ``root`` to ``blobs`` (verified commits); returns the
    manifest in path order. Identical bytes already stored are not uploaded again."""
    published = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        with open(path, "rb") as handle:
            staged = blobs.stage(handle, max_bytes=_NO_LIMIT, what=path.name)
        try:
            blobs.commit(staged)
        except BaseException:
            blobs.discard(staged)
            raise
        published.append(PublishedFile(path.relative_to(root).as_posix(), staged.sha256, staged.size))
    return published


def manifest_to_json(files: list[PublishedFile]) -> list[dict[str, Any]]:
    """The manifest as the database stores it."""
    return [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]


def manifest_from_json(rows: list[dict[str, Any]]) -> list[PublishedFile]:
    """The manifest read back from the database."""
    return [PublishedFile(str(r["path"]), str(r["sha256"]), int(r["size"])) for r in rows]
