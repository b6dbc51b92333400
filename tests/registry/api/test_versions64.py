"""Versions are 64-bit end to end (issue 15, item 8): created, read, patched, downloaded
and deleted over HTTP on both databases, across the old 2^31 - 1 limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import brick_metadata, random_adapter, register_base, upload


def test_version_past_2_to_the_31_works_everywhere(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(1)
    first = upload(client, config=config, weights=weights, metadata=brick_metadata("big", version=2**31 - 1))
    assert first.status_code == 201, first.text
    config2, weights2 = random_adapter(2)
    automatic = upload(client, config=config2, weights=weights2, metadata=brick_metadata("big"))
    assert automatic.status_code == 201, automatic.text
    assert automatic.json()["version"] == 2**31
    config3, weights3 = random_adapter(3)
    huge = 2**62
    explicit = upload(client, config=config3, weights=weights3, metadata=brick_metadata("big", version=huge))
    assert explicit.status_code == 201, explicit.text
    for version in (2**31, huge):
        got = client.get(f"/v1/bricks/big/versions/{version}")
        assert got.status_code == 200, got.text
        assert got.json()["version"] == version
        patched = client.patch(f"/v1/bricks/big/versions/{version}", json={"tags": ["wide"]})
        assert patched.status_code == 200 and patched.json()["tags"] == ["wide"]
        downloaded = client.get(f"/v1/bricks/big/versions/{version}/files/adapter_model.safetensors")
        assert downloaded.status_code == 200
        assert downloaded.content == (weights2 if version == 2**31 else weights3)
    assert client.get("/v1/bricks/big").json()["version"] == huge
    assert client.delete(f"/v1/bricks/big/versions/{2**31}").status_code == 200
    assert client.get(f"/v1/bricks/big/versions/{2**31}").status_code == 404
    assert client.get(f"/v1/bricks/big/versions/{2**63}").status_code == 422  # past int64: refused, not a 500
