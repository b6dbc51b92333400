"""Downloads from object storage are verified by the server like local ones (issue 15,
item 10): an object that is missing or of another size answers the 500 problem
``storage-corrupt`` before any byte; one of the right size with other bytes is hashed while it
streams and the response is cut short before its last chunk (the headers were sent); a range
is served only from an object verified whole. A log line names the blob each time. REST and
Hugging Face routes, on moto S3, both databases."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, random_adapter, register_base, upload

pytestmark = pytest.mark.parametrize("storage", ["s3"], indirect=True)

WEIGHTS = "adapter_model.safetensors"
ROUTES = (f"/v1/bricks/sentiment/versions/1/files/{WEIGHTS}", f"/bricks/sentiment/resolve/main/{WEIGHTS}")


@pytest.fixture
def brick(client: Any, llama_base: Path) -> tuple[bytes, str]:
    register_base(client, llama_base)
    config, weights = random_adapter(41)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("sentiment"))
    assert response.status_code == 201, response.text
    return weights, response.json()["sha256"]


def _replace_object(registry: Any, s3_client: Any, sha256: str, data: bytes | None) -> None:
    key = registry.blobs.key(sha256)
    if data is None:
        s3_client.delete_object(Bucket=registry.blobs.bucket, Key=key)
    else:
        s3_client.put_object(Bucket=registry.blobs.bucket, Key=key, Body=data)


def _logged(caplog: pytest.LogCaptureFixture, sha256: str) -> bool:
    return any("storage corrupt" in r.getMessage() and sha256 in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_missing_or_resized_object_is_a_storage_corrupt_problem(
    brick: Any, client: Any, registry: Any, s3_client: Any, caplog: pytest.LogCaptureFixture, route: str, damage: str
) -> None:
    weights, sha256 = brick
    _replace_object(registry, s3_client, sha256, weights[:-10] if damage == "truncate" else None)
    with caplog.at_level(logging.ERROR, logger="brickyard"):
        response = client.get(route)
    assert response.status_code == 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/storage-corrupt")
    assert _logged(caplog, sha256)


@pytest.mark.parametrize("route", ROUTES)
def test_an_object_with_other_bytes_is_cut_short_and_a_range_of_it_refused(
    brick: Any, client: Any, registry: Any, s3_client: Any, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    weights, sha256 = brick
    altered = bytearray(weights)
    altered[len(weights) // 2] ^= 0x01  # same size: only hashing can tell
    _replace_object(registry, s3_client, sha256, bytes(altered))
    with caplog.at_level(logging.ERROR, logger="brickyard"):
        whole = client.get(route)
    assert int(whole.headers["content-length"]) == len(weights)
    assert len(whole.content) < len(weights)  # never the altered bytes whole
    assert _logged(caplog, sha256)
    part = client.get(route, headers={"Range": "bytes=0-99"})
    assert part.status_code == 500 and part.json()["type"].endswith("/storage-corrupt")


def test_intact_objects_stream_whole_and_in_ranges(brick: Any, client: Any) -> None:
    weights, _ = brick
    for route in ROUTES:
        assert client.get(route).content == weights
        part = client.get(route, headers={"Range": "bytes=5-14"})
        assert part.status_code == 206 and part.content == weights[5:15]
