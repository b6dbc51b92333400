"""Blobs are checked before they are served: present, of the recorded size, and (once per
process and file version) of the recorded sha256.

Local blobs (`VerifiedBlobs`) are hashed before the response starts. Blobs of another store
(`StreamedBlobCheck`: S3) are checked for presence and size before the response starts (a
HEAD), and hashed while they stream: the last chunk is held back until the digest is known,
so a corrupt object ends the response early (the connection is dropped short of its
``Content-Length``: the headers were sent) instead of delivering wrong bytes whole. A range
request is served only from an object verified whole in this process (read once if not).

A blob that is missing, truncated or altered on disk must not be handed to a client as if it
were the brick it was registered as: the download answers a 500 problem ``storage-corrupt``
and the server logs the blob, so an operator runs ``brickyard fsck``. Hashing a file costs a
read of it, so a verified file (same inode, size and modification time) is remembered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn, Protocol

from registry.errors import StorageCorrupt

if TYPE_CHECKING:
    from registry.storage.blobs import BlobInfo

__all__ = ["StreamedBlobCheck", "VerifiedBlobs", "sha256_of"]

log = logging.getLogger("brickyard")

_CHUNK = 1 << 20


class _Paths(Protocol):
    def path(self, sha256: str) -> Path: ...


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class VerifiedBlobs:
    """Local paths of blobs, checked against their recorded digest and size."""

    def __init__(self, blobs: _Paths, *, remembered: int = 4096) -> None:
        self.blobs = blobs
        self._verified: OrderedDict[tuple[str, int, int, int], None] = OrderedDict()
        self._lock = threading.Lock()
        self._remembered = remembered

    def path(self, sha256: str, size: int, *, what: str) -> Path:
        """The path of blob ``sha256``, after checking it.

        Raises:
            StorageCorrupt: the blob is missing, has another size, or another digest.
        """
        path = self.blobs.path(sha256)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._corrupt(what, sha256, "its blob is missing")
        if stat.st_size != size:
            self._corrupt(what, sha256, f"its blob has {stat.st_size} bytes, {size} were stored")
        key = (sha256, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return path
        actual = sha256_of(path)
        if actual != sha256:
            self._corrupt(what, sha256, "its blob's sha256 differs from the recorded one")
        with self._lock:
            self._verified[key] = None
            while len(self._verified) > self._remembered:
                self._verified.popitem(last=False)
        return path

    @staticmethod
    def _corrupt(what: str, sha256: str, reason: str) -> NoReturn:
        _corrupt(what, sha256, reason)


def _corrupt(what: str, sha256: str, reason: str) -> NoReturn:
    log.error("storage corrupt: %s: %s (blob %s); run `brickyard fsck`", what, reason, sha256)
    raise StorageCorrupt(
        f"the stored bytes of {what} are damaged; the server's operator should run `brickyard fsck`",
        errors=[f"{what}: {reason}"],
    )


class _Objects(Protocol):
    def info(self, sha256: str) -> BlobInfo | None: ...
    def open(self, sha256: str, start: int = 0, end: int | None = None) -> BinaryIO: ...


class StreamedBlobCheck:
    """Downloads from a blob store that is not a local directory (S3), checked server-side:
    see the module docstring."""

    def __init__(self, blobs: _Objects, *, remembered: int = 4096) -> None:
        self.blobs = blobs
        self._verified: OrderedDict[tuple[str, int, float], None] = OrderedDict()
        self._lock = threading.Lock()
        self._remembered = remembered

    def before_response(self, sha256: str, size: int, *, what: str, whole: bool) -> None:
        """Check what can be checked before headers are sent: the object exists with the
        recorded size; for a part of it (``whole`` False), that it was verified whole (it is
        read and hashed now if not).

        Raises:
            StorageCorrupt: missing, another size, or (for a part) another sha256.
        """
        info = self.blobs.info(sha256)
        if info is None:
            _corrupt(what, sha256, "its blob is missing")
        if info.size != size:
            _corrupt(what, sha256, f"its blob has {info.size} bytes, {size} were stored")
        if whole or self._known(sha256, info):
            return
        digest = hashlib.sha256()
        with self.blobs.open(sha256) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            _corrupt(what, sha256, "its blob's sha256 differs from the recorded one")
        self._remember(sha256, info)

    def stream(self, chunks: Iterator[bytes], sha256: str, size: int, *, what: str) -> Iterator[bytes]:
        """``chunks`` (the whole blob) passed through while hashed, the last one held back
        until the size and sha256 are confirmed.

        Raises:
            StorageCorrupt: after the bytes so far were sent (the response is cut short).
        """
        digest = hashlib.sha256()
        count = 0
        held: bytes | None = None
        for chunk in chunks:
            digest.update(chunk)
            count += len(chunk)
            if held is not None:
                yield held
            held = chunk
        if count != size or digest.hexdigest() != sha256:
            _corrupt(what, sha256, f"its blob streamed {count} bytes that do not hash to the recorded sha256")
        if held is not None:
            yield held
        info = self.blobs.info(sha256)
        if info is not None:
            self._remember(sha256, info)

    def _known(self, sha256: str, info: BlobInfo) -> bool:
        with self._lock:
            key = (sha256, info.size, info.modified)
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
            return False

    def _remember(self, sha256: str, info: BlobInfo) -> None:
        with self._lock:
            self._verified[(sha256, info.size, info.modified)] = None
            while len(self._verified) > self._remembered:
                self._verified.popitem(last=False)
