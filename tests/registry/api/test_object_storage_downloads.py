"""Downloads of bricks and published compositions when the bytes are in object storage, on
both backends: streamed with Range through the REST and Hugging Face routes, or a 307 to a
presigned URL when the setting allows it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import register_base, upload, wait_ready

pytestmark = pytest.mark.parametrize("storage", ["s3"], indirect=True)

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def presigning(settings: Any) -> Iterator[TestClient]:
    """A second app on the same database and bucket, with presigned downloads enabled."""
    from registry.api import create_app
    from registry.service import Registry

    changed = settings.model_copy(update={"blobs": settings.blobs.model_copy(update={"presigned_downloads": True})})
    registry = Registry.open(changed)
    token, _ = registry.tokens.create("presign-test", "admin", actor="tests")
    try:
        with TestClient(
            create_app(registry=registry), follow_redirects=False, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            yield client
    finally:
        registry.close()


def test_brick_files_stream_from_the_bucket_with_range(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"]).status_code == 201
    data = (loras["r4"] / WEIGHTS).read_bytes()
    whole = client.get(f"/v1/bricks/sentiment/versions/1/files/{WEIGHTS}")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    part = client.get(f"/v1/bricks/sentiment/versions/1/files/{WEIGHTS}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    hub = client.get(f"/bricks/sentiment/resolve/main/{WEIGHTS}")
    assert hub.status_code == 200 and hub.content == data
    assert hub.headers["x-linked-etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert client.head(f"/bricks/sentiment/resolve/main/{WEIGHTS}").headers["content-length"] == str(len(data))


def test_presigned_redirects_for_bricks_compositions_and_the_hub(
    client: Any, presigning: TestClient, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"]).status_code == 201
    data = (loras["r4"] / WEIGHTS).read_bytes()
    for path in (f"/v1/bricks/sentiment/versions/1/files/{WEIGHTS}", f"/bricks/sentiment/resolve/main/{WEIGHTS}"):
        redirect = presigning.get(path)
        assert redirect.status_code == 307, path
        assert httpx.get(redirect.headers["location"]).content == data  # no token: the URL is the credential
    assert client.get(f"/v1/bricks/sentiment/versions/1/files/{WEIGHTS}").status_code == 200  # setting off: streamed

    body = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"}
    ).json()
    assert wait_ready(client, body["id"])["status"] == "ready"
    composed = client.get(f"/v1/compositions/{body['id']}/files/{WEIGHTS}")
    assert composed.status_code == 200 and len(composed.content) > 0
    redirect = presigning.get(f"/v1/compositions/{body['id']}/files/{WEIGHTS}")
    assert redirect.status_code == 307
    fetched = httpx.get(redirect.headers["location"], headers={"Range": "bytes=0-7"})
    assert fetched.status_code == 206 and fetched.content == composed.content[:8]
    hub = client.get(f"/compositions/{body['id']}/resolve/main/{WEIGHTS}")
    assert hub.status_code == 200 and hub.content == composed.content


def test_hub_lists_git_blob_ids_of_published_files(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    """A full composition's small files (config, tokenizer) live in the bucket: the Hub
    listing names them by git's blob id of their bytes, as the Hub does."""
    import subprocess

    register_base(client, llama_base)
    assert upload(client, loras["r4"]).status_code == 201
    body = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "full"}
    ).json()
    assert wait_ready(client, body["id"])["status"] == "ready"
    tree = client.get(f"/api/models/compositions/{body['id']}/tree/main").json()
    small = [entry for entry in tree if entry["type"] == "file" and "lfs" not in entry]
    assert any(entry["path"] == "config.json" for entry in small)
    for entry in small:
        data = client.get(f"/compositions/{body['id']}/resolve/main/{entry['path']}").content
        git = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True)
        assert entry["oid"] == git.stdout.decode().strip(), entry["path"]
