"""``brickyard fsck``: check database rows against stored bytes, and repair what is safe.

Checked:

* every blob a brick row references exists (``missing``) and still hashes to its name
  (``corrupt``; skipped with ``verify=False``);
* blobs no row references (``orphaned``: left by a crash between writing the bytes and the
  row, or by deleted bricks), staging files of interrupted uploads, and multipart uploads
  an object store holds for a process that died mid-upload (``stale_uploads``);
* ready compositions whose directory is gone (or, published to the blob store, one of
  whose blobs is missing: their blobs are checked as the bricks' are), directories no
  composition owns, and half-built composition directories.

Repairs (``repair=True``) only remove what nothing points at, and only once it is older
than ``grace_s``, so that an upload or a build in flight is never touched. Missing or
corrupt bytes cannot be repaired here: they are reported with the bricks they break.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry.builds.compositions import Compositions
    from registry.storage.blobs import BlobStore
    from registry.storage.store import Store

__all__ = ["FsckReport", "fsck"]


@dataclass
class FsckReport:
    """What `fsck` found, and what it removed."""

    checked_blobs: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    staging_leftovers: list[str] = field(default_factory=list)
    stale_uploads: list[str] = field(default_factory=list)
    composition_problems: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No missing or corrupt data (orphans are harmless)."""
        return not (self.missing or self.corrupt)


def _now() -> float:
    return time.time()


def _old(path: Path, grace_s: float) -> bool:
    try:
        return _now() - path.stat().st_mtime > grace_s
    except FileNotFoundError:
        return False


def _old_blob(blobs: BlobStore, digest: str, grace_s: float) -> bool:
    info = blobs.info(digest)  # the store's clock of the object (a bucket's Last-Modified)
    return info is not None and _now() - info.modified > grace_s


def fsck(
    store: Store,
    blobs: BlobStore,
    compositions: Compositions,
    *,
    repair: bool = False,
    verify: bool = True,
    grace_s: float = 3600.0,
    job_blobs: Mapping[str, str] | None = None,
    after_listing: Callable[[], None] | None = None,
) -> FsckReport:
    """Check (and optionally repair) the storage of bricks (``store`` rows against ``blobs``)
    and of ``compositions``; ``job_blobs`` (sha256 -> label) are blobs other jobs on the
    queue use (an emergent discovery's probe sets), kept like a brick's. See the module docstring.

    A blob is deleted only inside `Store.delete_blob_if_unreferenced`, which checks again,
    under the lock registrations take, that no row references it and that it is still
    older than ``grace_s`` (a registration deduplicating onto it refreshes its age): a
    brick registered while fsck runs never loses its bytes. ``after_listing`` runs between
    the listing and the deletions (tests drive that race with it)."""
    report = FsckReport()
    referenced: dict[str, list[str]] = {}
    for brick_ref, digests in store.blob_references().items():
        for digest in digests:
            referenced.setdefault(digest, []).append(brick_ref)
    for digest, composition_ids in compositions.store.published_digests().items():
        referenced.setdefault(digest, []).extend(f"composition {cid}" for cid in composition_ids)
    for digest, label in (job_blobs or {}).items():
        referenced.setdefault(digest, []).append(label)
    for digest, bricks in sorted(referenced.items()):
        report.checked_blobs += 1
        if not blobs.exists(digest):
            report.missing.append(f"{digest} (used by {', '.join(sorted(set(bricks)))})")
        elif verify and not blobs.verify(digest):
            report.corrupt.append(f"{digest} (used by {', '.join(sorted(set(bricks)))})")
    orphans = [digest for digest in blobs.digests() if digest not in referenced]
    report.orphaned.extend(orphans)
    if after_listing is not None:
        after_listing()
    for digest in orphans:
        if repair and _old_blob(blobs, digest, grace_s):

            def delete(digest: str = digest) -> bool:
                if not _old_blob(blobs, digest, grace_s):
                    return False
                blobs.delete(digest)
                return True

            if store.delete_blob_if_unreferenced(digest, delete):
                report.removed.append(f"blob {digest}")
    for leftover in sorted(blobs.staging_files()):
        report.staging_leftovers.append(leftover.name)
        if repair and _old(leftover, grace_s):
            leftover.unlink(missing_ok=True)
            report.removed.append(f"staging file {leftover.name}")
    uploads = blobs.stale_uploads()
    for upload in uploads:
        report.stale_uploads.append(f"{upload.key} (upload {upload.upload_id})")
    if repair and any(_now() - upload.initiated > grace_s for upload in uploads):
        cutoff = _now() - grace_s
        blobs.sweep_staging(grace_s)  # aborts the uploads older than the grace period
        report.removed.extend(f"stale upload {u.key}" for u in uploads if u.initiated < cutoff)
    _check_compositions(compositions, report, repair=repair, grace_s=grace_s)
    return report


def _check_compositions(compositions: Compositions, report: FsckReport, *, repair: bool, grace_s: float) -> None:
    root = compositions.root
    ready = {cid for cid, _ in compositions.store.ready_by_age()}
    published = compositions.store.published_digests()
    lost = {cid for digest, cids in published.items() if not compositions.blobs.exists(digest) for cid in cids}
    for composition_id in sorted(ready):
        if composition_id in lost or (
            compositions.store.published_files(composition_id) is None
            and not (root / composition_id / "brickyard.json").is_file()
        ):
            report.composition_problems.append(f"composition {composition_id} is ready but its files are gone")
            if repair and compositions.store.delete_ready(composition_id):
                shutil.rmtree(root / composition_id, ignore_errors=True)
                report.removed.append(f"composition record {composition_id}")
    known = ready | {cid for cid, _, _ in compositions.store.running()}
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if entry.name.startswith("."):
            owner = entry.name[1:65]
            if ".composing-" in entry.name and owner not in known:
                report.composition_problems.append(f"half-built directory {entry.name}")
                if repair and _old(entry, grace_s):
                    shutil.rmtree(entry, ignore_errors=True)
                    report.removed.append(f"half-built directory {entry.name}")
        elif entry.is_dir() and entry.name not in known:
            report.composition_problems.append(f"directory {entry.name} belongs to no ready composition")
            if repair and _old(entry, grace_s):
                shutil.rmtree(entry, ignore_errors=True)
                report.removed.append(f"composition directory {entry.name}")
