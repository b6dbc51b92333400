"""Base models in object storage: a base registered from ``s3://bucket/prefix`` is read from
a local copy, so a worker on any machine needs only the database URL and the bucket.

The copy lives under ``<home>/cache/bases/<hash of the URL>/``. Each use lists the prefix
(one request per 1000 files) and downloads only files whose ETag differs from the copy's
(the first use downloads the whole model). Files are written to a temporary name and
renamed, and the list of ETags is written last, so a copy interrupted midway is completed,
never read half-written. The composer checks the base's fingerprint before every build, so
a model changed in the bucket is refused as a changed local directory is.

Not done: registration downloads the whole model, not only ``config.json`` and the
safetensors headers (ranged reads of the headers would make it cheap for large models).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = ["base_model_dir", "is_s3_url"]

_MANIFEST = ".brickyard-etags.json"
_lock = threading.Lock()


def is_s3_url(path: str) -> bool:
    """Whether a base model path names object storage."""
    return path.startswith("s3://")


def base_model_dir(path: str, settings: Settings) -> Path:
    """The local directory holding a base model's files: ``path`` itself, or for an
    ``s3://`` URL the local copy, brought up to date first.

    Raises:
        ValueError: a malformed ``s3://`` URL. FileNotFoundError: nothing under the prefix.
        ServiceUnavailable: the object store does not answer.
    """
    if not is_s3_url(path):
        return Path(path).expanduser()
    from registry.s3_blobs import _storage_errors, make_s3_client, parse_s3_url

    bucket, prefix = parse_s3_url(path)
    target = settings.home / "cache" / "bases" / hashlib.sha256(path.encode()).hexdigest()[:24]
    client = make_s3_client(endpoint_url=settings.blobs.endpoint_url, region=settings.blobs.region)
    with _lock, _storage_errors():
        _sync(client, bucket, prefix, target)
    return target


def _sync(client: Any, bucket: str, prefix: str, target: Path) -> None:
    wanted: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", ()):
            relative = entry["Key"][len(prefix) :]
            parts = relative.split("/")
            if relative and not relative.endswith("/") and not any(p.startswith(".") or p == ".." for p in parts):
                wanted[relative] = entry["ETag"]
    if not wanted:
        raise FileNotFoundError(f"no files under s3://{bucket}/{prefix}")
    manifest = target / _MANIFEST
    try:
        have: dict[str, str] = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        have = {}
    if have == wanted:
        return
    target.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # incomplete until rewritten below
    for relative, etag in sorted(wanted.items()):
        local = target / relative
        if have.get(relative) == etag and local.is_file():
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=local.parent, prefix=".download-")
        os.close(fd)
        try:
            client.download_file(bucket, prefix + relative, name)
            os.replace(name, local)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    for relative in set(have) - set(wanted):
        (target / relative).unlink(missing_ok=True)
    manifest.write_text(json.dumps(wanted, sort_keys=True))
