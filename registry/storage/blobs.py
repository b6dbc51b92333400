"""Content-addressed blob storage.

Bytes are first *staged*: streamed into a temporary file (hashing as they go, stopping at
a size limit), then *committed*: fsync'd and renamed to ``sha256/<ab>/<digest>``. A name
under ``sha256/`` therefore always holds complete, verified bytes; a crash leaves at worst
a file under ``tmp/`` that `LocalBlobStore.sweep_staging` removes.

`BlobStore` is the interface the service uses; `registry.storage.s3_blobs.S3BlobStore` implements
it on S3-compatible object storage (staging to a local temporary file, committing with a
conditional PUT). Callers never assume the bytes are a local file: they `open` a byte range,
ask for `local_path` (a verified local copy, fetched when needed) or a `presigned_url`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from registry.errors import PayloadTooLarge

__all__ = ["BlobInfo", "BlobStore", "LocalBlobStore", "StagedBlob", "StagingFile", "StaleUpload"]

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StagedBlob:
    """Bytes written to a private temporary file, not yet visible in the store."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class BlobInfo:
    """Size and last-modified time of a stored blob."""

    sha256: str
    size: int
    modified: float  # seconds since the epoch


@dataclass(frozen=True)
class StaleUpload:
    """A multipart upload that was started and never completed nor aborted (its parts cost
    storage but no object is visible)."""

    key: str
    upload_id: str
    initiated: float  # seconds since the epoch


class StagingFile(io.RawIOBase):
    """A staging file written a chunk at a time (an upload's body streaming in), hashed and
    bounded as it is written; `finish` hands it over as a `StagedBlob`. Closed unfinished
    (an error, a client gone), it removes itself."""

    def __init__(self, staging_dir: Path, *, max_bytes: int, what: str) -> None:
        fd, name = tempfile.mkstemp(dir=staging_dir, prefix="stage-")
        self.path = Path(name)
        self._out = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self._size = 0
        self._max_bytes = max_bytes
        self._what = what
        self._finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Append ``data``, refusing more than ``max_bytes`` in all.

        Raises:
            PayloadTooLarge: the limit is passed (the file is then removed).
        """
        chunk = bytes(data)
        self._size += len(chunk)
        if self._size > self._max_bytes:
            self.close()
            raise PayloadTooLarge(
                f"{self._what} is larger than the limit of {self._max_bytes} bytes",
                extra={"limit_bytes": self._max_bytes},
            )
        self._digest.update(chunk)
        self._out.write(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        """No-op for a writer (multipart parsers rewind a finished part); the position is the end."""
        return self._size

    def finish(self) -> StagedBlob:
        """The staged bytes (the file is closed, and kept for `BlobStore.commit`)."""
        self._out.close()
        self._finished = True
        super().close()
        return StagedBlob(path=self.path, sha256=self._digest.hexdigest(), size=self._size)

    def close(self) -> None:
        if not self._finished:
            self._out.close()
            self.path.unlink(missing_ok=True)
        super().close()


class BlobStore(Protocol):
    """What the service needs from a blob store."""

    def stage(self, source: BinaryIO, *, max_bytes: int, what: str) -> StagedBlob: ...
    def staging_file(self, *, max_bytes: int, what: str) -> StagingFile: ...
    def stage_bytes(self, data: bytes) -> StagedBlob: ...
    def commit(self, staged: StagedBlob) -> bool: ...
    def discard(self, staged: StagedBlob) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def info(self, sha256: str) -> BlobInfo | None: ...
    def open(self, sha256: str, start: int = 0, end: int | None = None) -> BinaryIO: ...
    def local_path(self, sha256: str) -> Path: ...
    def presigned_url(self, sha256: str, *, filename: str | None = None) -> str | None: ...
    def delete(self, sha256: str) -> None: ...
    def digests(self) -> Iterator[str]: ...
    def verify(self, sha256: str) -> bool: ...
    def staging_files(self) -> list[Path]: ...
    def stale_uploads(self) -> list[StaleUpload]: ...
    def sweep_staging(self, older_than_s: float = 3600.0) -> int: ...


class LocalBlobStore:
    """Blobs in a local directory: ``<root>/sha256/ab/abcdef...`` and ``<root>/tmp/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "sha256"
        self._staging = self.root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)

    def stage(self, source: BinaryIO, *, max_bytes: int, what: str = "upload") -> StagedBlob:
        """Copy ``source`` into a staging file, hashing it, refusing more than ``max_bytes``.

        Raises:
            PayloadTooLarge: ``source`` holds more than ``max_bytes`` (nothing is left behind).
        """
        staging = self.staging_file(max_bytes=max_bytes, what=what)
        try:
            while chunk := source.read(_CHUNK):
                staging.write(chunk)
        except BaseException:
            staging.close()
            raise
        return staging.finish()

    def staging_file(self, *, max_bytes: int, what: str = "upload") -> StagingFile:
        """A new staging file to write a stream into (`StagingFile`): an upload goes from the
        request body straight here, with no copy of its own."""
        return StagingFile(self._staging, max_bytes=max_bytes, what=what)

    def stage_bytes(self, data: bytes) -> StagedBlob:
        """Stage an in-memory byte string."""
        fd, name = tempfile.mkstemp(dir=self._staging, prefix="stage-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except BaseException:  # a full disk: leave nothing half-written
            Path(name).unlink(missing_ok=True)
            raise
        return StagedBlob(path=Path(name), sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def commit(self, staged: StagedBlob) -> bool:
        """Make a staged blob visible under its sha256 (durably: fsync file and directory).

        Returns:
            True when the blob is new, False when identical bytes were already stored
            (the staged copy is then discarded).
        """
        target = self.path(staged.sha256)
        if target.exists():
            # Deduplicated onto stored bytes (perhaps an orphan fsck is about to collect):
            # refresh their age, so the grace period counts from this registration.
            try:
                os.utime(target)
            except FileNotFoundError:
                pass  # collected just now: fall through and store the staged copy
            else:
                staged.path.unlink(missing_ok=True)
                return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(staged.path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(staged.path, 0o444)
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        return True

    def discard(self, staged: StagedBlob) -> None:
        """Remove a staged blob that will not be committed."""
        staged.path.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        """Whether a committed blob with this digest exists."""
        return self.path(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """Local path of a committed blob (it may not exist)."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._objects / sha256[:2] / sha256

    def info(self, sha256: str) -> BlobInfo | None:
        """Size and modification time of a committed blob, or None when it is absent."""
        try:
            stat = self.path(sha256).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(sha256, stat.st_size, stat.st_mtime)

    def open(self, sha256: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """Open a committed blob's bytes ``[start, end)`` (to the end when ``end`` is None).

        Raises:
            FileNotFoundError: no such blob.
            ValueError: an empty or reversed range, or one starting past the end (as S3's 416).
        """
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"bad byte range [{start}, {end})")
        handle = open(self.path(sha256), "rb")  # noqa: SIM115 - returned to the caller, who closes it
        if start == 0 and end is None:
            return handle
        if start > 0 and start >= os.fstat(handle.fileno()).st_size:
            handle.close()
            raise ValueError(f"byte range [{start}, {end}) starts past the end of {sha256}")
        handle.seek(start)
        return cast(BinaryIO, _RangeReader(handle, None if end is None else end - start))

    def local_path(self, sha256: str) -> Path:
        """The blob's local file (committed bytes are verified when written).

        Raises:
            FileNotFoundError: no such blob.
        """
        path = self.path(sha256)
        if not path.is_file():
            raise FileNotFoundError(f"no blob {sha256}")
        return path

    def presigned_url(self, sha256: str, *, filename: str | None = None) -> str | None:
        """None: a local directory has no URL of its own (the API serves the file)."""
        return None

    def delete(self, sha256: str) -> None:
        """Delete a committed blob (no error if it is absent)."""
        self.path(sha256).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        """sha256 of every committed blob."""
        for shard in sorted(self._objects.iterdir()):
            if shard.is_dir():
                for blob in sorted(shard.iterdir()):
                    if len(blob.name) == 64:
                        yield blob.name

    def verify(self, sha256: str) -> bool:
        """Whether the blob's bytes still hash to its name."""
        digest = hashlib.sha256()
        with self.open(sha256) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def staging_files(self) -> list[Path]:
        """Staging files present now (uploads in flight, or left by a crash)."""
        return [p for p in self._staging.iterdir() if p.is_file()]

    def stale_uploads(self) -> list[StaleUpload]:
        """None here: a local upload in flight is a staging file (`staging_files`)."""
        return []

    def sweep_staging(self, older_than_s: float = 3600.0) -> int:
        """Remove staging files left by crashed uploads; returns how many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for leftover in self._staging.iterdir():
            try:
                stale = leftover.stat().st_mtime < cutoff
            except FileNotFoundError:  # an upload in flight finished meanwhile
                continue
            if stale:
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed


class _RangeReader(io.RawIOBase):
    """At most ``limit`` bytes of an open file from its current position (all when None)."""

    def __init__(self, handle: BinaryIO, limit: int | None) -> None:
        self._handle = handle
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        count = self._handle.readinto(view)  # type: ignore[attr-defined]
        if self._left is not None:
            self._left -= count
        return int(count)

    def close(self) -> None:
        self._handle.close()
        super().close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
