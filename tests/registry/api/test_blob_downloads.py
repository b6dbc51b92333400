"""Downloads streamed from object storage with HTTP Range, or redirected to presigned URLs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient

from registry.api.blob_downloads import blob_response
from registry.api.problems import install_problem_handlers
from registry.storage.s3_blobs import S3BlobStore, make_s3_client

DATA = bytes(range(256)) * 20  # 5120 bytes


def _store(endpoint: str, bucket: str, cache: Path, presigned_expires_s: int | None = None) -> S3BlobStore:
    client = make_s3_client(endpoint_url=endpoint, region="us-east-1")
    return S3BlobStore(client, bucket, "dl/", cache_dir=cache, presigned_expires_s=presigned_expires_s)


@pytest.fixture
def stored(s3_endpoint: str, bucket: str, tmp_path: Path) -> str:
    """The sha256 of DATA and an empty blob, committed to the bucket."""
    store = _store(s3_endpoint, bucket, tmp_path / "writer")
    for data in (DATA, b""):
        store.commit(store.stage_bytes(data))
    return hashlib.sha256(DATA).hexdigest()


def _client(store: S3BlobStore, *, redirect: bool = False) -> Iterator[TestClient]:
    app = FastAPI()
    install_problem_handlers(app)

    @app.api_route("/files/{sha256}", methods=["GET", "HEAD"])
    def download(sha256: str, request: Request) -> Response:
        size = len(DATA) if sha256 == hashlib.sha256(DATA).hexdigest() else 0
        return blob_response(
            request,
            store,
            sha256=sha256,
            size=size,
            media_type="application/octet-stream",
            filename="adapter_model.safetensors",
            etag=sha256,
            redirect=redirect,
        )

    with TestClient(app, follow_redirects=False) as client:
        yield client


@pytest.fixture
def api(s3_endpoint: str, bucket: str, tmp_path: Path, stored: str) -> Iterator[tuple[TestClient, S3BlobStore]]:
    store = _store(s3_endpoint, bucket, tmp_path / "server")
    for client in _client(store):
        yield client, store


def _gets(store: S3BlobStore) -> list[Any]:
    calls: list[Any] = []
    store._client.meta.events.register("before-call.s3.GetObject", lambda **kwargs: calls.append(kwargs))
    return calls


def test_whole_blob(api: tuple[TestClient, S3BlobStore], stored: str) -> None:
    client, _ = api
    response = client.get(f"/files/{stored}")
    assert response.status_code == 200 and response.content == DATA
    assert response.headers["content-length"] == str(len(DATA))
    assert response.headers["etag"] == f'"{stored}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="adapter_model.safetensors"'


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=8-15", 8, 16), ("bytes=5000-", 5000, 5120), ("bytes=-64", 5056, 5120), ("bytes=5100-99999", 5100, 5120)],
)
def test_one_range(api: tuple[TestClient, S3BlobStore], stored: str, header: str, start: int, end: int) -> None:
    client, _ = api
    response = client.get(f"/files/{stored}", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == DATA[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert response.headers["content-length"] == str(end - start)


def test_several_ranges_get_the_whole_blob(api: tuple[TestClient, S3BlobStore], stored: str) -> None:
    client, _ = api
    response = client.get(f"/files/{stored}", headers={"Range": "bytes=0-9, 100-199"})
    assert response.status_code == 200 and response.content == DATA


def test_bad_ranges_are_problems(api: tuple[TestClient, S3BlobStore], stored: str) -> None:
    client, store = api
    gets = _gets(store)
    outside = client.get(f"/files/{stored}", headers={"Range": "bytes=999999-"})
    assert outside.status_code == 416
    assert outside.headers["content-type"] == "application/problem+json"
    assert outside.json()["size_bytes"] == len(DATA)
    malformed = client.get(f"/files/{stored}", headers={"Range": "pages=1-2"})
    assert malformed.status_code == 422 and malformed.headers["content-type"] == "application/problem+json"
    assert gets == []  # refused before touching the bucket


def test_head_reads_no_bytes(api: tuple[TestClient, S3BlobStore], stored: str) -> None:
    client, store = api
    gets = _gets(store)
    response = client.head(f"/files/{stored}", headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.headers["content-length"] == "10"
    assert gets == []


def test_empty_blob(api: tuple[TestClient, S3BlobStore]) -> None:
    client, _ = api
    response = client.get(f"/files/{hashlib.sha256(b'').hexdigest()}")
    assert response.status_code == 200 and response.content == b""


def test_redirect_to_presigned_url(s3_endpoint: str, bucket: str, tmp_path: Path, stored: str) -> None:
    for client in _client(_store(s3_endpoint, bucket, tmp_path / "s", presigned_expires_s=300), redirect=True):
        response = client.get(f"/files/{stored}", headers={"Range": "bytes=8-15"})
        assert response.status_code == 307
        location = response.headers["location"]
        assert location.startswith(f"{s3_endpoint}/{bucket}/dl/sha256/") and "X-Amz-Signature=" in location
        direct = httpx.get(location, headers={"Range": "bytes=8-15"})  # the client repeats its Range
        assert direct.status_code == 206 and direct.content == DATA[8:16]
    # A store that signs nothing streams even when redirects are allowed.
    for client in _client(_store(s3_endpoint, bucket, tmp_path / "u"), redirect=True):
        response = client.get(f"/files/{stored}")
        assert response.status_code == 200 and response.content == DATA
