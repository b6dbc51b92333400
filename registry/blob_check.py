"""Blobs are checked before they are served: present, of the recorded size, and (once per
process and file version) of the recorded sha256.

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
from pathlib import Path
from typing import Protocol

from registry.errors import StorageCorrupt

__all__ = ["VerifiedBlobs", "sha256_of"]

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
    def _corrupt(what: str, sha256: str, reason: str) -> None:
        log.error("storage corrupt: %s: %s (blob %s); run `brickyard fsck`", what, reason, sha256)
        raise StorageCorrupt(
            f"the stored bytes of {what} are damaged; the server's operator should run `brickyard fsck`",
            errors=[f"{what}: {reason}"],
        )
