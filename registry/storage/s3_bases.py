"""Base models in object storage: a base registered from ``s3://bucket/prefix`` is read from
local files, so a worker on any machine needs only the database URL and the bucket.

Two local views of the prefix, under ``<home>/cache/``, each brought up to date on use
(the prefix is listed, one request per 1000 files, and only files whose ETag changed are
fetched again):

* `base_model_headers` (``base-headers/<hash of the URL>/``): what registration and
  planning read, and no tensor data. ``config.json`` and the shard index are fetched whole;
  of every top-level ``*.safetensors`` file only the 8-byte header length and the JSON
  header, by two ranged GETs, written at the start of a sparse file of the object's size,
  so `composer.read_base_model` validates offsets against the true size. For a 16 GB model
  that is a few hundred KiB instead of 16 GB.
* `base_model_dir` (``bases/<hash of the URL>/``): every file, for builds, which read the
  weights (the first build on a machine downloads the whole model).

Files are written to a temporary name and renamed, and the list of ETags is written last,
so a view interrupted midway is completed, never read half-written. The composer checks
the base's fingerprint before every build, so a model changed in the bucket is refused as a
changed local directory is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = ["base_model_dir", "base_model_files", "base_model_headers", "is_s3_url"]

_MANIFEST = ".brickyard-etags.json"
_lock = threading.Lock()
# The files `composer.read_base_model` parses whole; it refuses either above 16 MiB, so a
# larger one is not fetched (a sparse file of its size gets the same refusal).
_WHOLE_FILES = frozenset({"config.json", "model.safetensors.index.json"})
_MAX_WHOLE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Listed:
    etag: str
    size: int


# fetch(client, bucket, key, listed, destination): write the local file of one object.
_Fetch = Callable[[Any, str, str, _Listed, Path, int], None]


def is_s3_url(path: str) -> bool:
    """Whether a base model path names object storage."""
    return path.startswith("s3://")


def base_model_dir(path: str, settings: Settings) -> Path:
    """The local directory holding a base model's files: ``path`` itself, or for an
    ``s3://`` URL the local copy of every file, brought up to date first.

    Raises:
        ValueError: a malformed ``s3://`` URL. FileNotFoundError: nothing under the prefix.
        ServiceUnavailable: the object store does not answer.
    """
    if not is_s3_url(path):
        return Path(path).expanduser()
    return _view(path, settings, "bases", _fetch_whole, lambda relative: True)


def base_model_headers(path: str, settings: Settings) -> Path:
    """A local directory that reads like the base model at ``path`` for everything but tensor
    data: ``path`` itself, or for an ``s3://`` URL the header view (module docstring): enough
    for `composer.read_base_model`, `find_linear_modules` and `plan_composition`.

    Raises:
        ValueError: a malformed ``s3://`` URL. FileNotFoundError: nothing under the prefix.
        ServiceUnavailable: the object store does not answer.
    """
    if not is_s3_url(path):
        return Path(path).expanduser()
    return _view(path, settings, "base-headers", _fetch_for_headers, _read_by_registration)


def base_model_files(path: str, settings: Settings) -> frozenset[str]:
    """Names of the regular files at the top of a base model, none of them read: a directory's
    entries, or for an ``s3://`` URL one listing of the prefix.

    Raises:
        ValueError: a malformed ``s3://`` URL. OSError: the directory cannot be listed.
        ServiceUnavailable: the object store does not answer.
    """
    if not is_s3_url(path):
        return frozenset(p.name for p in Path(path).expanduser().iterdir() if p.is_file())
    from registry.storage.s3_blobs import _storage_errors, make_s3_client, parse_s3_url

    bucket, prefix = parse_s3_url(path)
    client = make_s3_client(endpoint_url=settings.blobs.endpoint_url, region=settings.blobs.region)
    with _storage_errors():
        return frozenset(relative for relative in _list(client, bucket, prefix) if "/" not in relative)


def _read_by_registration(relative: str) -> bool:
    return "/" not in relative and (relative in _WHOLE_FILES or relative.endswith(".safetensors"))


def _view(path: str, settings: Settings, kind: str, fetch: _Fetch, wanted: Callable[[str], bool]) -> Path:
    from registry.storage.s3_blobs import _storage_errors, make_s3_client, parse_s3_url

    bucket, prefix = parse_s3_url(path)
    target = settings.home / "cache" / kind / hashlib.sha256(path.encode()).hexdigest()[:24]
    client = make_s3_client(endpoint_url=settings.blobs.endpoint_url, region=settings.blobs.region)
    with _lock, _storage_errors():
        _sync(client, bucket, prefix, target, fetch, wanted, settings.limits.max_header_bytes)
    return target


def _list(client: Any, bucket: str, prefix: str) -> dict[str, _Listed]:
    listed: dict[str, _Listed] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", ()):
            relative = entry["Key"][len(prefix) :]
            parts = relative.split("/")
            if relative and not relative.endswith("/") and not any(p.startswith(".") or p == ".." for p in parts):
                listed[relative] = _Listed(entry["ETag"], int(entry["Size"]))
    return listed


def _sync(
    client: Any,
    bucket: str,
    prefix: str,
    target: Path,
    fetch: _Fetch,
    wanted: Callable[[str], bool],
    max_header_bytes: int,
) -> None:
    listed = _list(client, bucket, prefix)
    if not listed:
        raise FileNotFoundError(f"no files under s3://{bucket}/{prefix}")
    chosen = {relative: entry for relative, entry in listed.items() if wanted(relative)}
    etags = {relative: entry.etag for relative, entry in chosen.items()}
    manifest = target / _MANIFEST
    try:
        have: dict[str, str] = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        have = {}
    if have == etags:
        return
    target.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # incomplete until rewritten below
    for relative, entry in sorted(chosen.items()):
        local = target / relative
        if have.get(relative) == entry.etag and local.is_file():
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=local.parent, prefix=".download-")
        os.close(fd)
        try:
            fetch(client, bucket, prefix + relative, entry, Path(name), max_header_bytes)
            os.replace(name, local)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    for relative in set(have) - set(etags):
        (target / relative).unlink(missing_ok=True)
    manifest.write_text(json.dumps(etags, sort_keys=True))


def _fetch_whole(client: Any, bucket: str, key: str, listed: _Listed, destination: Path, _: int) -> None:
    client.download_file(bucket, key, str(destination))


def _fetch_for_headers(
    client: Any, bucket: str, key: str, listed: _Listed, destination: Path, max_header_bytes: int
) -> None:
    """The file `read_base_model` reads: a small JSON file whole; of a safetensors file the
    length and the header (when the length is plausible), then extended to the object's size
    without writing (a sparse file), so the header is checked against the true size."""
    with open(destination, "r+b") as out:
        if not key.endswith(".safetensors"):
            if listed.size <= _MAX_WHOLE_BYTES:
                out.write(_get(client, bucket, key, 0, listed.size))
        elif listed.size <= 8:  # too short to hold a header: read_header says so from these bytes
            out.write(_get(client, bucket, key, 0, listed.size))
        else:
            head = _get(client, bucket, key, 0, 8)
            out.write(head)
            length = int.from_bytes(head, "little")
            # An implausible length (or another format's magic bytes) is refused by read_header
            # from the first 8 bytes and the size alone: the rest is not fetched.
            if 0 < length <= max_header_bytes and 8 + length <= listed.size:
                out.write(_get(client, bucket, key, 8, 8 + length))
        out.truncate(listed.size)


def _get(client: Any, bucket: str, key: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an object, by a ranged GET (nothing for an empty range)."""
    if end <= start:
        return b""
    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
    try:
        data = bytes(body.read())
    finally:
        body.close()
    if len(data) != end - start:
        raise ValueError(f"s3://{bucket}/{key} changed while it was read ({len(data)} of {end - start} bytes)")
    return data
