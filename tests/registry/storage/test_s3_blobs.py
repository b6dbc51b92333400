"""The blob-store contract, on the local directory and on S3-compatible object storage
(moto's S3 server on loopback), plus what only object storage has: multipart uploads,
conditional creates, crashes mid-upload, ranged reads, the read-through cache and
presigned URLs."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry.errors import PayloadTooLarge, ServiceUnavailable, StorageCorrupt
from registry.settings import Settings
from registry.storage.blobs import LocalBlobStore
from registry.storage.s3_blobs import S3BlobStore, make_blob_store, make_s3_client, parse_s3_url

_MiB = 1024 * 1024


def _s3_store(endpoint: str, bucket: str, cache_dir: Path, **options: Any) -> S3BlobStore:
    return S3BlobStore(
        make_s3_client(endpoint_url=endpoint, region="us-east-1"), bucket, "team/blobs/", cache_dir=cache_dir, **options
    )


# -- the same contract on both backends ------------------------------------------------------


@dataclass
class Backend:
    """A blob store and what a test needs to reach behind its back."""

    store: LocalBlobStore | S3BlobStore
    staging_dir: Path
    overwrite: Any  # (sha256, bytes) -> None: replace stored bytes without the store knowing


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each contract test runs on the local directory and on object storage."""
    if request.param == "local":
        local = LocalBlobStore(tmp_path / "blobs")

        def overwrite_local(sha256: str, data: bytes) -> None:
            path = local.path(sha256)
            path.chmod(0o644)
            path.write_bytes(data)

        return Backend(local, tmp_path / "blobs" / "tmp", overwrite_local)
    endpoint = request.getfixturevalue("s3_endpoint")
    client = request.getfixturevalue("s3_client")
    name = request.getfixturevalue("bucket")
    store = _s3_store(endpoint, name, tmp_path / "cache")

    def overwrite_s3(sha256: str, data: bytes) -> None:
        client.put_object(Bucket=name, Key=store.key(sha256), Body=data)

    return Backend(store, tmp_path / "cache" / "tmp", overwrite_s3)


def test_stage_commit_open(backend: Backend) -> None:
    store = backend.store
    data = b"hello bricks" * 1000
    staged = store.stage(io.BytesIO(data), max_bytes=1 << 20, what="weights")
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.size == len(data)
    assert not store.exists(staged.sha256)  # staged bytes are not visible
    assert list(store.digests()) == []
    assert store.commit(staged) is True
    assert store.exists(staged.sha256)
    with store.open(staged.sha256) as handle:
        assert handle.read() == data
    assert store.verify(staged.sha256)
    assert list(store.digests()) == [staged.sha256]
    assert list(backend.staging_dir.iterdir()) == []


def test_identical_bytes_are_stored_once(backend: Backend) -> None:
    store = backend.store
    first = store.stage_bytes(b"same")
    second = store.stage_bytes(b"same")
    assert store.commit(first) is True
    assert store.commit(second) is False
    assert list(store.digests()) == [first.sha256]
    assert list(backend.staging_dir.iterdir()) == []


def test_discarded_blob_is_never_visible(backend: Backend) -> None:
    store = backend.store
    staged = store.stage_bytes(b"a registration that failed validation")
    store.discard(staged)
    assert not store.exists(staged.sha256)
    assert list(store.digests()) == []
    assert list(backend.staging_dir.iterdir()) == []


def test_oversized_stream_is_refused_and_leaves_nothing(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(PayloadTooLarge):
        store.stage(io.BytesIO(b"x" * 5000), max_bytes=4096, what="weights")
    assert list(backend.staging_dir.iterdir()) == []
    assert list(store.digests()) == []


def test_corruption_is_detected(backend: Backend) -> None:
    store = backend.store
    staged = store.stage_bytes(b"original")
    store.commit(staged)
    assert store.verify(staged.sha256)
    backend.overwrite(staged.sha256, b"tampered")
    assert not store.verify(staged.sha256)


def test_only_hex_digests_name_blobs(backend: Backend) -> None:
    store = backend.store
    for bad in ("../../etc/passwd", "A" * 64, "abc", "g" * 64):
        with pytest.raises(ValueError):
            store.exists(bad)
        with pytest.raises(ValueError):
            store.open(bad)
        with pytest.raises(ValueError):
            store.delete(bad)


def test_missing_blob(backend: Backend) -> None:
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert not backend.store.exists(absent)
    with pytest.raises(FileNotFoundError):
        backend.store.open(absent).read()
    backend.store.delete(absent)  # no error


def test_info_local_path_and_the_rest_of_the_protocol(backend: Backend) -> None:
    before = time.time()
    staged = backend.store.stage_bytes(b"some bytes")
    backend.store.commit(staged)
    info = backend.store.info(staged.sha256)
    assert info is not None and (info.sha256, info.size) == (staged.sha256, 10)
    assert before - 2 <= info.modified <= time.time() + 2  # the store's clock (a bucket's: whole seconds)
    local = backend.store.local_path(staged.sha256)
    assert local.read_bytes() == b"some bytes"
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert backend.store.info(absent) is None
    with pytest.raises(FileNotFoundError):
        backend.store.local_path(absent)
    assert backend.store.stale_uploads() == []
    if isinstance(backend.store, LocalBlobStore):
        assert backend.store.presigned_url(staged.sha256) is None  # served by the API itself


def test_delete(backend: Backend) -> None:
    store = backend.store
    kept, gone = store.stage_bytes(b"kept"), store.stage_bytes(b"deleted")
    store.commit(kept)
    store.commit(gone)
    store.delete(gone.sha256)
    assert not store.exists(gone.sha256) and store.exists(kept.sha256)
    assert list(store.digests()) == [kept.sha256]


def test_digests_are_sorted(backend: Backend) -> None:
    store = backend.store
    expected = []
    for i in range(12):
        staged = store.stage_bytes(f"blob {i}".encode())
        store.commit(staged)
        expected.append(staged.sha256)
    assert list(store.digests()) == sorted(expected)


def test_sweep_removes_old_staging_files(backend: Backend) -> None:
    store = backend.store
    staged = store.stage_bytes(b"left by a crash")
    os.utime(staged.path, (0, 0))
    fresh = store.stage_bytes(b"upload in progress")
    assert store.sweep_staging(older_than_s=60) == 1
    assert not staged.path.exists()
    assert fresh.path.exists()
    assert store.staging_files() == [fresh.path]


# -- object storage only ---------------------------------------------------------------------


@pytest.fixture
def s3(s3_endpoint: str, bucket: str, tmp_path: Path) -> S3BlobStore:
    """An S3 store whose uploads of 5 MiB or more go in 5 MiB parts (S3's smallest)."""
    return _s3_store(s3_endpoint, bucket, tmp_path / "cache", multipart_threshold=5 * _MiB, multipart_chunk=5 * _MiB)


def _counting(client: Any, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every ``operation`` request the client makes."""
    calls: list[dict[str, Any]] = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda params, **_: calls.append(params))
    return calls


def test_keys_are_content_addressed_under_the_prefix(s3: S3BlobStore, s3_client: Any, bucket: str) -> None:
    staged = s3.stage_bytes(b"addressed by content")
    s3.commit(staged)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"team/blobs/sha256/{staged.sha256[:2]}/{staged.sha256}"]
    head = s3_client.head_object(Bucket=bucket, Key=keys[0], ChecksumMode="ENABLED")
    # A single PUT: the object's own SHA-256 checksum is Brickyard's digest.
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == staged.sha256
    assert head["Metadata"] == {"sha256": staged.sha256}


@pytest.mark.parametrize(("size", "n_parts"), [(5 * _MiB, 1), (10 * _MiB, 2), (12 * _MiB + 123, 3)])
def test_multipart_upload(s3: S3BlobStore, s3_client: Any, bucket: str, size: int, n_parts: int) -> None:
    data = os.urandom(size)
    parts = _counting(s3._client, "UploadPart")
    puts = _counting(s3._client, "PutObject")
    staged = s3.stage(io.BytesIO(data), max_bytes=len(data), what="weights")
    assert s3.commit(staged) is True
    assert len(parts) == n_parts and puts == []
    key = s3.key(staged.sha256)
    head = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": staged.sha256}
    # S3's checksum of a multipart object: sha256 over the parts' sha256 digests.
    part_digests = b"".join(hashlib.sha256(data[i : i + 5 * _MiB]).digest() for i in range(0, len(data), 5 * _MiB))
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(hashlib.sha256(part_digests).digest()).decode()
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert s3.stale_uploads() == [] and s3.staging_files() == []


@pytest.mark.parametrize("size", [100, 6 * _MiB], ids=["put", "multipart"])
def test_concurrent_duplicate_commit_is_harmless(
    s3: S3BlobStore, s3_client: Any, bucket: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(size)
    first, second = s3.stage_bytes(data), s3.stage_bytes(data)
    assert s3.commit(first) is True
    before = s3_client.head_object(Bucket=bucket, Key=s3.key(first.sha256))
    # The other committer finished between this one's existence check and its upload.
    monkeypatch.setattr(s3, "exists", lambda sha256: False)
    assert s3.commit(second) is False
    after = s3_client.head_object(Bucket=bucket, Key=s3.key(first.sha256))
    assert after["LastModified"] == before["LastModified"] and after["ETag"] == before["ETag"]
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.staging_files() == []


@pytest.mark.parametrize("other_wins", [False, True])
def test_conflicting_conditional_write_is_retried(
    s3: S3BlobStore, s3_client: Any, bucket: str, other_wins: bool
) -> None:
    from botocore.exceptions import ClientError

    data = b"committed while another process commits the same bytes"
    staged = s3.stage_bytes(data)
    attempts = []

    def conflict_once(params: dict[str, Any], **_: Any) -> None:
        attempts.append(params["Key"])
        if len(attempts) == 1:  # S3 answers 409 to concurrent conditional writes of one key
            if other_wins:
                s3_client.put_object(Bucket=bucket, Key=params["Key"], Body=data)
            raise ClientError(
                {"Error": {"Code": "ConditionalRequestConflict"}, "ResponseMetadata": {"HTTPStatusCode": 409}},
                "PutObject",
            )

    s3._client.meta.events.register("before-parameter-build.s3.PutObject", conflict_once)
    assert s3.commit(staged) is (not other_wins)
    assert len(attempts) == (1 if other_wins else 2)
    assert s3.verify(staged.sha256) and s3.staging_files() == []


def test_failed_multipart_upload_leaves_nothing(s3: S3BlobStore, s3_client: Any, bucket: str) -> None:
    sent = []

    def fail_second_part(params: dict[str, Any], **_: Any) -> None:
        sent.append(params["PartNumber"])
        if params["PartNumber"] == 2:
            raise ConnectionResetError("connection lost mid-upload")

    s3._client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    staged = s3.stage_bytes(os.urandom(11 * _MiB))
    with pytest.raises(Exception, match="connection lost"):
        s3.commit(staged)
    assert 2 in sent
    assert not s3.exists(staged.sha256) and list(s3.digests()) == []
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted
    assert s3.staging_files() == []


@pytest.mark.parametrize("size", [100, 6 * _MiB], ids=["put", "multipart"])
def test_stored_object_that_differs_from_the_upload_is_refused(
    s3: S3BlobStore, s3_client: Any, bucket: str, size: int
) -> None:
    data = os.urandom(size)
    staged = s3.stage_bytes(data)
    key = s3.key(staged.sha256)

    def tamper(**_: Any) -> None:  # something rewrites the object before the store checks it
        s3_client.put_object(Bucket=bucket, Key=key, Body=data[:-1] + b"!", Metadata={"sha256": staged.sha256})

    operation = "CompleteMultipartUpload" if size > 100 else "PutObject"
    s3._client.meta.events.register(f"after-call.s3.{operation}", tamper)
    with pytest.raises(StorageCorrupt) as caught:
        s3.commit(staged)
    assert any("checksum" in problem for problem in caught.value.errors)
    assert not s3.exists(staged.sha256)


def test_ranged_reads(backend: Backend) -> None:
    s3 = backend.store  # both stores: the download routes read ranges through the protocol
    data = bytes(range(256)) * 40
    staged = s3.stage_bytes(data)
    s3.commit(staged)
    for start, end in [(0, 1), (5, 17), (100, None), (len(data) - 3, len(data)), (len(data) - 3, len(data) + 50)]:
        with s3.open(staged.sha256, start, end) as handle:
            assert handle.read() == data[start:end], (start, end)
    with s3.open(staged.sha256, 10, 10 + 3 * 1000) as handle:  # read piece by piece
        pieces = [handle.read(1000) for _ in range(4)]
    assert pieces == [data[10 + i * 1000 : 10 + (i + 1) * 1000] for i in range(3)] + [b""]
    for start, end in [(-1, 5), (5, 5), (9, 3)]:
        with pytest.raises(ValueError):
            s3.open(staged.sha256, start, end)
    with pytest.raises(ValueError, match="past the end"):
        s3.open(staged.sha256, len(data) + 1)


def test_local_path_is_a_verified_cached_copy(s3: S3BlobStore, s3_client: Any, bucket: str) -> None:
    good, bad = s3.stage_bytes(b"weights" * 100), s3.stage_bytes(b"more weights" * 100)
    s3.commit(good)
    s3.commit(bad)
    gets = _counting(s3._client, "GetObject")
    path = s3.local_path(good.sha256)
    assert path.read_bytes() == b"weights" * 100
    assert s3.local_path(good.sha256) == path and len(gets) == 1  # downloaded once
    s3_client.put_object(Bucket=bucket, Key=s3.key(bad.sha256), Body=b"rot")
    with pytest.raises(StorageCorrupt):
        s3.local_path(bad.sha256)
    assert not s3.cache.path(bad.sha256).exists() and s3.staging_files() == []
    with pytest.raises(FileNotFoundError):
        s3.local_path(hashlib.sha256(b"absent").hexdigest())
    s3.delete(good.sha256)
    assert not path.exists()


def test_cache_is_trimmed_least_recently_used_first(s3: S3BlobStore) -> None:
    digests = []
    for i in range(4):
        staged = s3.stage_bytes(bytes([i]) * 1000)
        s3.commit(staged)
        digests.append(staged.sha256)
    for age, digest in enumerate(digests):  # fetched in order 0, 1, 2, 3
        os.utime(s3.local_path(digest), (1000 + age, 1000 + age))
    s3.local_path(digests[0])  # used again: now the most recent
    assert s3.trim_cache(3000, keep={digests[1]}) == [digests[2]]  # 1 is pinned, 2 goes
    assert s3.trim_cache(2000) == [digests[1]]
    assert sorted(s3.cache.digests()) == sorted([digests[0], digests[3]])
    assert all(s3.exists(d) for d in digests)  # the bucket keeps everything
    assert s3.trim_cache(0) == [digests[3], digests[0]]


def test_presigned_urls(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    import httpx

    plain = _s3_store(s3_endpoint, bucket, tmp_path / "a")
    staged = plain.stage_bytes(b"0123456789")
    plain.commit(staged)
    assert plain.presigned_url(staged.sha256) is None  # not enabled
    signing = _s3_store(s3_endpoint, bucket, tmp_path / "b", presigned_expires_s=60)
    url = signing.presigned_url(staged.sha256, filename="adapter_model.safetensors")
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content == b"0123456789"
    assert whole.headers["content-disposition"] == 'attachment; filename="adapter_model.safetensors"'
    part = httpx.get(url, headers={"Range": "bytes=2-4"})
    assert part.status_code == 206 and part.content == b"234"
    # (moto does not check signatures, so a forged URL is not tried here)


def test_listing_is_paginated(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = _s3_store(s3_endpoint, bucket, tmp_path / "cache", list_page_size=7)
    expected = []
    for i in range(25):
        staged = store.stage_bytes(f"brick {i}".encode())
        store.commit(staged)
        expected.append(staged.sha256)
    lists = _counting(store._client, "ListObjectsV2")
    assert list(store.digests()) == sorted(expected)
    assert len(lists) == 4  # 7 + 7 + 7 + 4


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_or_refusing_storage_is_service_unavailable(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from botocore.config import Config

    def store(endpoint: str, bucket: str) -> S3BlobStore:
        config = Config(retries={"max_attempts": 1}, connect_timeout=2, s3={"addressing_style": "path"})
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
        return S3BlobStore(client, bucket, cache_dir=tmp_path / bucket)

    digest = hashlib.sha256(b"x").hexdigest()
    down = store(f"http://127.0.0.1:{_free_port()}", "bricks")  # nothing listens there
    for call in (lambda: down.exists(digest), lambda: list(down.digests()), lambda: down.open(digest)):
        with pytest.raises(ServiceUnavailable, match="object storage is unavailable"):
            call()
    no_bucket = store(s3_endpoint, "no-such-bucket")
    staged = no_bucket.stage_bytes(b"bytes with nowhere to go")
    with pytest.raises(ServiceUnavailable, match="NoSuchBucket"):
        no_bucket.commit(staged)
    assert no_bucket.staging_files() == []
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ServiceUnavailable, match="credentials"):
        store(s3_endpoint, "bricks").exists(digest)


_CRASHING_UPLOAD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from registry.storage.s3_blobs import S3BlobStore, make_s3_client

    endpoint, bucket, cache = sys.argv[1:4]
    client = make_s3_client(endpoint_url=endpoint, region="us-east-1")
    store = S3BlobStore(client, bucket, "team/blobs/", cache_dir=Path(cache),
                        multipart_threshold=5 << 20, multipart_chunk=5 << 20, max_concurrency=1)

    def stall(**_):  # after the first part: tell the test, then hang until killed
        print("part uploaded", flush=True)
        time.sleep(120)

    client.meta.events.register("after-call.s3.UploadPart", stall)
    staged = store.stage_bytes(os.urandom(16 << 20))
    print(staged.sha256, flush=True)
    store.commit(staged)
    """
)


def test_sigkill_during_multipart_upload_leaves_no_visible_object(
    s3: S3BlobStore, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_UPLOAD, s3_endpoint, bucket, str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        sha256 = child.stdout.readline().strip()
        assert child.stdout.readline().strip() == "part uploaded"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert len(sha256) == 64
    assert not s3.exists(sha256) and list(s3.digests()) == []
    (leftover,) = s3.stale_uploads()
    assert leftover.key == s3.key(sha256)
    assert len(s3.staging_files()) == 1  # the child's staging file, too
    # moto reports every upload as started in 2010, so the age cut-off is not exercised here.
    assert s3.sweep_staging(older_than_s=0) == 2
    assert s3.stale_uploads() == [] and s3.staging_files() == []
    assert not s3.exists(sha256)


# -- configuration ---------------------------------------------------------------------------


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bricks") == ("bricks", "")
    assert parse_s3_url("s3://bricks/") == ("bricks", "")
    assert parse_s3_url("s3://bricks/team/a/") == ("bricks", "team/a/")
    assert parse_s3_url("s3://bricks/team") == ("bricks", "team/")
    for bad in ("bricks/team", "s3:///team", "file:///tmp"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_settings_choose_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    local = make_blob_store(Settings(home=tmp_path))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "blobs"
    monkeypatch.setenv("BRICKYARD_HOME", str(tmp_path))
    monkeypatch.setenv("BRICKYARD_BLOBS__URL", f"s3://{bucket}/prod/bricks")
    monkeypatch.setenv("BRICKYARD_BLOBS__ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BRICKYARD_BLOBS__REGION", "us-east-1")
    monkeypatch.setenv("BRICKYARD_BLOBS__PRESIGNED_DOWNLOADS", "true")
    settings = Settings()
    store = make_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.presigned_expires_s) == (bucket, "prod/bricks/", 3600)
    assert store.cache.root == tmp_path / "cache" / "blobs"
    staged = store.stage_bytes(b"through the settings")
    store.commit(staged)
    assert store.key(staged.sha256) == f"prod/bricks/sha256/{staged.sha256[:2]}/{staged.sha256}"
    assert store.exists(staged.sha256)


def test_invalid_blob_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    for name, value in [
        ("BRICKYARD_BLOBS__URL", "s4://bricks"),
        ("BRICKYARD_BLOBS__URL", "s3://UPPER"),
        ("BRICKYARD_BLOBS__MULTIPART_CHUNK_BYTES", str(_MiB)),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(ValidationError):
                Settings()
