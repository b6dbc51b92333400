"""Content-addressed blobs in S3-compatible object storage (AWS S3, MinIO, Ceph, moto).

The same contract as `registry.storage.blobs.LocalBlobStore`, with the bytes in a bucket:

* keys are ``<prefix>sha256/<ab>/<digest>``, so a key always names complete bytes that hash
  to it;
* *staging* streams an upload into a local temporary file while hashing it (the local
  store's own code, in ``<cache_dir>/tmp``), so nothing reaches the bucket before its digest
  and size are known and within limits;
* *commit* uploads the staged file with boto3's transfer manager (one PUT below
  ``multipart_threshold``, parts above it) as a conditional create (``If-None-Match: *``),
  so a concurrent commit of the same bytes is harmless, and with SHA-256 checksums that the
  server checks (see `S3BlobStore.commit`). An object becomes visible only when its upload
  completes; a failed multipart upload is aborted, and one left by a killed process stays
  invisible and is listed by `S3BlobStore.stale_uploads` and removed by `sweep_staging`;
* reads stream (`open` takes a byte range), `local_path` materialises a blob in a verified
  local read-through cache for code that needs a file (the composer memory-maps shards),
  and `presigned_url` lets a client fetch the bytes from the bucket directly.

boto3 is imported only when an S3 store is built: the local default does not pay for it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ParamSpec, TypeVar, cast

from registry.errors import BrickyardError, ServiceUnavailable, StorageCorrupt
from registry.storage.blobs import BlobInfo, BlobStore, LocalBlobStore, StagedBlob, StagingFile, StaleUpload

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = ["BlobInfo", "S3BlobStore", "StaleUpload", "make_blob_store", "make_s3_client", "parse_s3_url"]

P = ParamSpec("P")
R = TypeVar("R")
_CHUNK = 1024 * 1024
_session: Any = None
_session_pid = 0
_session_lock = threading.Lock()
_HEX = frozenset("0123456789abcdef")
# Metadata field holding Brickyard's sha256 of the whole object (``x-amz-meta-sha256``). S3's own
# checksum of a multipart object is a checksum of the parts' checksums, not the object's sha256.
_META_SHA256 = "sha256"


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix/")``.

    The prefix is empty or ends with ``/``, so keys are ``prefix + "sha256/..."``.

    Raises:
        ValueError: not an ``s3://`` URL with a bucket.
    """
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_blob_store(settings: Settings) -> LocalBlobStore | S3BlobStore:
    """The blob store the settings select: S3 when ``blobs.url`` is an ``s3://`` URL, else the
    local directory ``settings.blob_root``."""
    if settings.blobs.url is None:
        return LocalBlobStore(settings.blob_root)
    bucket, prefix = parse_s3_url(settings.blobs.url)
    blobs = settings.blobs
    return S3BlobStore(
        make_s3_client(endpoint_url=blobs.endpoint_url, region=blobs.region),
        bucket,
        prefix,
        cache_dir=settings.blob_cache_dir,
        multipart_threshold=blobs.multipart_threshold_bytes,
        multipart_chunk=blobs.multipart_chunk_bytes,
        max_concurrency=blobs.max_concurrency,
        presigned_expires_s=blobs.presigned_expires_s if blobs.presigned_downloads else None,
        verify_checksums=blobs.verify_checksums,
    )


def make_s3_client(*, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client; credentials come from the usual AWS chain (environment, profile, role).

    A custom endpoint gets path-style addressing: MinIO and most S3-compatible servers (and
    an endpoint given as an IP address) do not resolve ``bucket.host`` names.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # Checksums only where an operation needs them or we ask for one (SHA-256 on uploads):
        # the SDK's default extra CRC32 on every upload is refused by some S3-compatible servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    global _session, _session_pid
    # One session per process: a new one loads the S3 service model again (~0.25 s). Sessions
    # are not thread-safe, clients are: create clients under a lock.
    with _session_lock:
        if _session is None or _session_pid != os.getpid():
            _session, _session_pid = boto3.session.Session(), os.getpid()
        return _session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Translate an object store that cannot be reached or refuses us (network, credentials,
    permissions, missing bucket, 5xx) into `ServiceUnavailable`, once, here: callers see
    Brickyard's errors only, and the API answers 503 with the reason."""
    try:
        yield
    except (BrickyardError, FileNotFoundError, ValueError):
        raise
    except Exception as exc:
        reason = _unavailable_reason(exc)
        if reason is None:
            raise
        raise ServiceUnavailable(f"object storage is unavailable: {reason}") from exc


def _translating_storage_errors(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        with _storage_errors():
            return method(*args, **kwargs)

    return translated


def _unavailable_reason(exc: BaseException) -> str | None:
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as EndpointUnreachable

    unavailable = (
        EndpointUnreachable,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ResponseStreamingError,
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, unavailable):
            return str(seen)
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            status = _status(seen) or 0
            if status == 403 or status >= 500 or error.get("Code") == "NoSuchBucket":
                return f"{error.get('Code', status)}: {error.get('Message', '')}".rstrip(": ")
            return None
        seen = seen.__cause__ or seen.__context__
    return None


class S3BlobStore:
    """Blobs under ``s3://<bucket>/<prefix>sha256/ab/abcdef...``; staging and a read-through
    cache in a local directory."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        cache_dir: Path,
        multipart_threshold: int = 64 * _CHUNK,
        multipart_chunk: int = 16 * _CHUNK,
        max_concurrency: int = 4,
        presigned_expires_s: int | None = None,
        list_page_size: int = 1000,
        verify_checksums: bool = True,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        if prefix and not prefix.endswith("/"):
            raise ValueError(f"prefix must be empty or end with '/': {prefix!r}")
        self.bucket = bucket
        self.prefix = prefix
        self._objects = f"{prefix}sha256/"
        self._client = client
        # The local store does the staging (hash while copying, size limit, nothing left on
        # failure) and is the read-through cache: same layout, same guarantees.
        self.cache = LocalBlobStore(cache_dir)
        self.presigned_expires_s = presigned_expires_s
        self._list_page_size = list_page_size
        self.verify_checksums = verify_checksums
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunk,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        # The transfer manager does not pass If-None-Match, so it is added to this client's
        # object-creating requests for keys of this store.
        for operation in ("PutObject", "CompleteMultipartUpload"):
            client.meta.events.register(
                f"before-parameter-build.s3.{operation}",
                self._conditional_create,
                unique_id=f"brickyard-if-none-match-{operation}-{bucket}-{prefix}",
            )

    def _conditional_create(self, params: dict[str, Any], **_: Any) -> None:
        if params.get("Bucket") == self.bucket and str(params.get("Key", "")).startswith(self._objects):
            params.setdefault("IfNoneMatch", "*")

    # -- keys -----------------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        """The object key of a blob.

        Raises:
            ValueError: ``sha256`` is not a lowercase hex sha256 digest.
        """
        if len(sha256) != 64 or not _HEX.issuperset(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{self._objects}{sha256[:2]}/{sha256}"

    # -- staging (local, as LocalBlobStore) -------------------------------------------------

    def stage(self, source: BinaryIO, *, max_bytes: int, what: str = "upload") -> StagedBlob:
        """Copy ``source`` into a local staging file, hashing it, refusing more than ``max_bytes``.

        Raises:
            PayloadTooLarge: ``source`` holds more than ``max_bytes`` (nothing is left behind).
        """
        return self.cache.stage(source, max_bytes=max_bytes, what=what)

    def stage_bytes(self, data: bytes) -> StagedBlob:
        """Stage an in-memory byte string."""
        return self.cache.stage_bytes(data)

    def staging_file(self, *, max_bytes: int, what: str = "upload") -> StagingFile:
        """A local staging file to write a stream into (committed with `commit`)."""
        return self.cache.staging_file(max_bytes=max_bytes, what=what)

    def discard(self, staged: StagedBlob) -> None:
        """Remove a staged blob that will not be committed."""
        self.cache.discard(staged)

    # -- commit ---------------------------------------------------------------------------

    @_translating_storage_errors
    def commit(self, staged: StagedBlob) -> bool:
        """Upload a staged blob under its sha256, check what was stored, remove the staged file.

        The upload is a conditional create (``If-None-Match: *``): when another process
        committed the same bytes first, the server answers 412 and nothing is overwritten.

        Verification: every request body carries its SHA-256 (``ChecksumAlgorithm='SHA256'``),
        which S3 recomputes and refuses on mismatch. A single PUT also sends the whole file's
        sha256 (``ChecksumSHA256``), so the object's checksum *is* Brickyard's digest; a
        multipart object's checksum is S3's composite (the sha256 of the parts' sha256s), which
        is computed here from the staged file. A HEAD after the upload then compares size,
        the ``sha256`` metadata field and that checksum. A server that keeps no checksums
        (some older S3-compatible ones) fails this check unless ``verify_checksums`` is off;
        then size and metadata are compared, and `verify` re-reads the bytes.

        Returns:
            True when the blob is new, False when identical bytes were already stored.

        Raises:
            StorageCorrupt: the stored object does not match the staged file (it is deleted).
        """
        key = self.key(staged.sha256)
        try:
            if self.exists(staged.sha256):
                return False
            extra: dict[str, Any] = {
                "ChecksumAlgorithm": "SHA256",
                "Metadata": {_META_SHA256: staged.sha256},
                "ContentType": "application/octet-stream",
            }
            multipart = staged.size >= self._transfer.multipart_threshold
            if multipart:
                expected = _composite_sha256(staged.path, self._part_size(staged.size))
            else:
                expected = _b64(bytes.fromhex(staged.sha256))
                extra["ChecksumSHA256"] = expected
            for attempt in range(3):
                try:
                    self._client.upload_file(str(staged.path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
                    break
                except Exception as exc:
                    # boto3 wraps the ClientError in S3UploadFailedError; s3transfer has already
                    # aborted a multipart upload that failed.
                    status = _status_in_chain(exc)
                    if status == 412:  # the same bytes were committed first by someone else
                        return False
                    # 409 ConditionalRequestConflict: S3 was completing a conditional write of the
                    # same key at the same moment; the other one may still fail, so look and retry.
                    if status != 409 or attempt == 2:
                        raise
                    if self.exists(staged.sha256):
                        return False
            self._check_upload(staged, key, expected)
            return True
        finally:
            self.cache.discard(staged)

    def _part_size(self, size: int) -> int:
        """The part size s3transfer uses for a file of ``size`` bytes (it raises the configured
        one to keep within S3's 10,000 parts and 5 MiB minimum)."""
        from s3transfer.utils import ChunksizeAdjuster

        return int(ChunksizeAdjuster().adjust_chunksize(self._transfer.multipart_chunksize, size))

    def _check_upload(self, staged: StagedBlob, key: str, expected_checksum: str) -> None:
        head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        problems = []
        if head["ContentLength"] != staged.size:
            problems.append(f"size {head['ContentLength']} != {staged.size}")
        if head.get("Metadata", {}).get(_META_SHA256) != staged.sha256:
            problems.append("the sha256 metadata field differs")
        checksum = head.get("ChecksumSHA256")
        if checksum is None:
            if self.verify_checksums:
                problems.append(
                    "the server kept no SHA-256 checksum (if it cannot, set BRICKYARD_BLOBS__VERIFY_CHECKSUMS=false)"
                )
        # A composite checksum reads "<base64>-<parts>" on AWS (moto omits the suffix).
        elif checksum.split("-")[0] != expected_checksum:
            problems.append(f"the object's SHA-256 checksum {checksum} != {expected_checksum}")
        if problems:
            self._client.delete_object(Bucket=self.bucket, Key=key)
            raise StorageCorrupt(f"the stored object {key} does not match the upload", errors=problems)

    # -- reads ----------------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        """Whether a committed blob with this digest exists."""
        return self.info(sha256) is not None

    @_translating_storage_errors
    def info(self, sha256: str) -> BlobInfo | None:
        """Size and modification time of a stored blob, or None when it is absent."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return BlobInfo(sha256, head["ContentLength"], head["LastModified"].timestamp())

    @_translating_storage_errors
    def open(self, sha256: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """Stream a committed blob's bytes ``[start, end)`` (to the end when ``end`` is None).

        Raises:
            FileNotFoundError: no such blob.
            ValueError: an empty or reversed range, or one starting past the end.
        """
        from botocore.exceptions import ClientError

        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"bad byte range [{start}, {end})")
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(sha256)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body = self._client.get_object(**args)["Body"]
        except ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(f"no blob {sha256}") from None
            if _status(exc) == 416:
                raise ValueError(f"byte range [{start}, {end}) starts past the end of {sha256}") from None
            raise
        return cast(BinaryIO, _StreamReader(body))

    @_translating_storage_errors
    def local_path(self, sha256: str) -> Path:
        """A local file holding the blob's bytes, downloaded once into the read-through cache
        and checked against the digest before it is used.

        Raises:
            FileNotFoundError: no such blob.
            StorageCorrupt: the stored bytes do not hash to ``sha256``.
        """
        cached = self.cache.path(sha256)
        try:
            os.utime(cached)  # a use: the clock of `trim_cache`'s least-recently-used order
            return cached
        except FileNotFoundError:
            pass
        with self.open(sha256) as body:
            staged = self.cache.stage(body, max_bytes=1 << 62, what=sha256)
        if staged.sha256 != sha256:
            self.cache.discard(staged)
            raise StorageCorrupt(
                f"stored blob {sha256} is corrupt; run `brickyard fsck`",
                errors=[f"{sha256}: bytes hash to {staged.sha256}"],
            )
        self.cache.commit(staged)  # a concurrent download of the same blob is harmless
        return cached

    def trim_cache(self, max_bytes: int, *, keep: Collection[str] = ()) -> list[str]:
        """Remove cached copies, least recently used first, until the cache holds at most
        ``max_bytes``; blobs in ``keep`` (those a build is about to read) stay. A file already
        open keeps its bytes until closed (POSIX), so only a path handed out and not yet opened
        is at risk: pass those in ``keep``.

        Returns:
            The digests whose cached copies were removed.
        """
        cached = []
        for digest in self.cache.digests():
            try:
                stat = self.cache.path(digest).stat()
            except FileNotFoundError:
                continue
            cached.append((stat.st_mtime, stat.st_size, digest))
        total = sum(size for _, size, _ in cached)
        removed = []
        for _, size, digest in sorted(cached):
            if total <= max_bytes:
                break
            if digest not in keep:
                self.cache.delete(digest)
                total -= size
                removed.append(digest)
        return removed

    def presigned_url(self, sha256: str, *, filename: str | None = None) -> str | None:
        """A URL from which anyone may GET the blob (with ``Range``) until it expires, or None
        when presigned downloads are not enabled."""
        if self.presigned_expires_s is None:
            return None
        params = {"Bucket": self.bucket, "Key": self.key(sha256)}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presigned_expires_s)
        return url

    @_translating_storage_errors
    def verify(self, sha256: str) -> bool:
        """Whether the stored bytes still hash to their name (reads the whole object)."""
        digest = hashlib.sha256()
        with self.open(sha256) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    # -- listing and deletion ---------------------------------------------------------------

    def digests(self) -> Iterator[str]:
        """sha256 of every committed blob, in sorted order (listed a page at a time)."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(
            paginator.paginate(
                Bucket=self.bucket, Prefix=self._objects, PaginationConfig={"PageSize": self._list_page_size}
            )
        )
        while True:
            with _storage_errors():
                page = next(pages, None)
            if page is None:
                return
            for entry in page.get("Contents", ()):
                name = entry["Key"].rsplit("/", 1)[-1]
                if len(name) == 64 and _HEX.issuperset(name):
                    yield name

    @_translating_storage_errors
    def delete(self, sha256: str) -> None:
        """Delete a committed blob and its cached copy (no error if it is absent)."""
        self._client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self.cache.delete(sha256)

    # -- crash leftovers ------------------------------------------------------------------

    def staging_files(self) -> list[Path]:
        """Local staging files present now (uploads in flight, or left by a crash)."""
        return self.cache.staging_files()

    @_translating_storage_errors
    def stale_uploads(self) -> list[StaleUpload]:
        """Multipart uploads under this store's prefix that were never completed nor aborted:
        in flight, or left by a process that died mid-upload. No object is visible for them."""
        uploads = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._objects):
            for upload in page.get("Uploads", ()):
                initiated: datetime = upload["Initiated"]
                if initiated.tzinfo is None:
                    initiated = initiated.replace(tzinfo=UTC)
                uploads.append(StaleUpload(upload["Key"], upload["UploadId"], initiated.timestamp()))
        return uploads

    @_translating_storage_errors
    def sweep_staging(self, older_than_s: float = 3600.0) -> int:
        """Abort multipart uploads and remove local staging files older than ``older_than_s``
        (left by crashed uploads); returns how many were removed."""
        from botocore.exceptions import ClientError

        cutoff = time.time() - older_than_s
        removed = self.cache.sweep_staging(older_than_s)
        for upload in self.stale_uploads():
            if upload.initiated < cutoff:
                try:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id)
                except ClientError as exc:
                    if _status(exc) != 404:  # completed or aborted meanwhile
                        raise
                removed += 1
        return removed


class _StreamReader(io.RawIOBase):
    """A botocore response body as a file object (``read``, ``readinto``, context manager).

    Closing it returns the connection to the pool; not reading to the end is fine.
    """

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with _storage_errors():
            data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        with _storage_errors():
            return bytes(self._body.read(None if size is None or size < 0 else size))

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


if TYPE_CHECKING:

    def _implements_the_protocol(store: S3BlobStore) -> BlobStore:  # checked by mypy only
        return store


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _composite_sha256(path: Path, part_size: int) -> str:
    """S3's composite SHA-256 of a multipart object: base64 of the sha256 of the parts'
    sha256 digests, concatenated."""
    digests = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            part, remaining = hashlib.sha256(), part_size
            while remaining and (chunk := handle.read(min(_CHUNK, remaining))):
                part.update(chunk)
                remaining -= len(chunk)
            if remaining == part_size:
                break
            digests.update(part.digest())
    return _b64(digests.digest())


def _status(exc: Any) -> int | None:
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _status_in_chain(exc: BaseException) -> int | None:
    """The HTTP status of the first S3 error response behind ``exc`` (boto3 wraps them)."""
    seen: BaseException | None = exc
    while seen is not None:
        status = _status(seen)
        if status is not None:
            return status
        seen = seen.__cause__ or seen.__context__
    return None
