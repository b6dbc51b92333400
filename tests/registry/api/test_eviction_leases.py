"""Cache eviction never removes a composition while it is being downloaded (issue 15,
item 11): downloads hold a lease in the database. Eviction is driven from inside the
archive stream, after its first chunk, so the race is deterministic. Both databases."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, register_base, upload, wait_ready


@pytest.fixture
def ready_composition(client: Any, llama_base: Path, loras: dict[str, Path]) -> str:
    register_base(client, llama_base)
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    response = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "full"}
    )
    composition_id = str(response.json()["id"])
    assert wait_ready(client, composition_id)["status"] == "ready"
    return composition_id


def test_eviction_during_an_archive_download_keeps_the_composition(
    client: Any, registry: Any, ready_composition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import registry.api.routes.compositions as routes

    monkeypatch.setattr(registry.settings.compose, "cache_bytes", 1)  # everything is over budget
    evicted_midway: list[list[str]] = []
    original = routes.tar_stream

    def tar_stream_with_eviction(root: Path, relative: list[str]) -> Iterator[bytes]:
        for i, chunk in enumerate(original(root, relative)):
            if i == 1:
                evicted_midway.append(registry.compositions.evict_to_budget())
            yield chunk

    monkeypatch.setattr(routes, "tar_stream", tar_stream_with_eviction)
    archive = client.get(f"/v1/compositions/{ready_composition}/archive")
    assert archive.status_code == 200
    assert evicted_midway == [[]]  # the lease held it
    assert int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert "model.safetensors" in tar.getnames() or any(n.endswith(".safetensors") for n in tar.getnames())
    # The download is over, its lease released: now eviction takes it.
    assert registry.compositions.evict_to_budget() == [ready_composition]
    assert client.get(f"/v1/compositions/{ready_composition}").status_code == 404


def test_a_file_download_holds_the_composition_until_sent(
    client: Any, registry: Any, ready_composition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry.settings.compose, "cache_bytes", 1)
    lease = registry.compositions.lease(ready_composition)
    assert registry.compositions.evict_to_budget() == []
    assert client.get(f"/v1/compositions/{ready_composition}/files/config.json").status_code == 200
    assert registry.compositions.evict_to_budget() == []  # the first lease still holds it
    lease.release()
    assert registry.compositions.evict_to_budget() == [ready_composition]


def test_an_expired_lease_does_not_hold(registry: Any, ready_composition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.settings.compose, "cache_bytes", 1)
    registry.compositions.lease(ready_composition, ttl_s=-1)  # a crashed server's lease, expired
    assert registry.compositions.evict_to_budget() == [ready_composition]
