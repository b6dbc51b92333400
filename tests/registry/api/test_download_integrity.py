"""Downloads serve only the registered bytes (issue 15, item 10): a blob that is missing,
of another size or another sha256 answers a 500 problem ``storage-corrupt`` with a log line;
``brickyard brick pull`` of such a brick exits non-zero and writes nothing; HEAD works on
file routes. Both databases."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, random_adapter, register_base, upload

WEIGHTS = "/v1/bricks/sentiment/versions/1/files/adapter_model.safetensors"


@pytest.fixture
def brick(client: Any, llama_base: Path) -> tuple[Any, bytes, str]:
    register_base(client, llama_base)
    config, weights = random_adapter(7)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("sentiment"))
    assert response.status_code == 201
    return client, weights, response.json()["sha256"]


def _blob(registry: Any, sha256: str) -> Path:
    return Path(registry.blobs.path(sha256))


def _assert_corrupt(response: Any) -> None:
    assert response.status_code == 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/storage-corrupt")


def test_the_registered_bytes_are_served_and_head_answers(brick: Any) -> None:
    client, weights, sha256 = brick
    assert client.get(WEIGHTS).content == weights
    head = client.head(WEIGHTS)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(weights)
    assert head.headers["etag"] == f'"{sha256}"'
    assert head.content == b""


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_blob_is_storage_corrupt_and_logged(
    brick: Any, registry: Any, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    client, weights, sha256 = brick
    path = _blob(registry, sha256)
    os.chmod(path, 0o644)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(weights[:-10])
    else:
        path.unlink()
    with caplog.at_level(logging.ERROR, logger="brickyard"):
        _assert_corrupt(client.get(WEIGHTS))
    assert any("storage corrupt" in r.getMessage() and sha256 in r.getMessage() for r in caplog.records)


def test_a_verified_blob_altered_later_is_caught(brick: Any, registry: Any) -> None:
    client, weights, sha256 = brick
    assert client.get(WEIGHTS).status_code == 200  # verified and remembered
    path = _blob(registry, sha256)
    os.chmod(path, 0o644)
    data = bytearray(weights)
    data[100] ^= 0x01
    path.write_bytes(bytes(data))  # same size, new modification time
    _assert_corrupt(client.get(WEIGHTS))


def test_brick_pull_of_a_corrupt_blob_exits_non_zero(brick: Any, registry: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from registry.cli.app import app
    from registry.client import RemoteClient

    client, weights, sha256 = brick
    path = _blob(registry, sha256)
    os.chmod(path, 0o644)
    path.write_bytes(weights[:-1] + bytes([weights[-1] ^ 0xFF]))
    out = tmp_path / "pulled"
    env = {"BRICKYARD_HOME": str(registry.settings.home), "BRICKYARD_DATABASE_URL": registry.settings.database_url}
    result = CliRunner().invoke(app, ["brick", "pull", "sentiment@1", "--out", str(out)], env=env)
    assert result.exit_code != 0
    assert "storage-corrupt" in result.output or "damaged" in result.output
    assert not (out / "adapter_model.safetensors").exists()
    # The remote client checks the bytes itself too: a server (or proxy) that sends others.
    remote = RemoteClient("http://testserver", http=client)
    with pytest.raises(Exception, match=r"storage|damaged|not the registered") as raised:
        remote.download_brick("sentiment", 1, tmp_path / "remote")
    assert type(raised.value).__name__ == "StorageCorrupt"
    assert not (tmp_path / "remote" / "adapter_model.safetensors").exists()


def test_remote_client_refuses_bytes_that_differ_from_the_listing(tmp_path: Path) -> None:
    import hashlib

    import httpx

    from registry.client import RemoteClient
    from registry.errors import StorageCorrupt

    served = b"not the registered bytes"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=served)

    http = httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))
    remote = RemoteClient("http://x", http=http)
    target = tmp_path / "f"
    with pytest.raises(StorageCorrupt):
        remote.download_file("/f", target, sha256=hashlib.sha256(b"other").hexdigest(), size=len(served))
    assert not target.exists() and not (tmp_path / "f.partial").exists()
    remote.download_file("/f", target, sha256=hashlib.sha256(served).hexdigest(), size=len(served))
    assert target.read_bytes() == served
