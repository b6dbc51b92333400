"""Concurrent registrations over HTTP on both backends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import brick_metadata, random_adapter, register_base, stored_blobs, upload


def test_eight_clients_registering_one_name_get_unique_gap_free_versions(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)

    def register(seed: int) -> Any:
        config, weights = random_adapter(seed)
        return upload(client, metadata=brick_metadata("shared-name"), config=config, weights=weights)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(register, range(8)))
    assert {r.status_code for r in responses} <= {201, 409}
    versions = sorted(r.json()["version"] for r in responses if r.status_code == 201)
    assert versions == list(range(1, len(versions) + 1))
    listed = client.get("/v1/bricks/shared-name/versions", params={"limit": 100}).json()["items"]
    assert sorted(b["version"] for b in listed) == versions


def test_the_same_bytes_registered_concurrently_are_stored_once(client: Any, registry: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(7)

    def register(index: int) -> Any:
        return upload(client, metadata=brick_metadata(f"copy-{index}"), config=config, weights=weights)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(register, range(8)))
    winners = [r for r in responses if r.status_code == 201]
    losers = [r for r in responses if r.status_code == 409]
    assert len(winners) == 1 and len(losers) == 7
    winner = winners[0].json()["name"]
    assert all(r.json()["existing"]["name"] == winner for r in losers)
    assert registry.store.count_bricks() == 1
    committed = [p for p in stored_blobs(registry.settings.home) if p.parent.parent.name == "sha256"]
    assert len(committed) == 2  # the weights once, the config once
    assert registry.blobs.staging_files() == []
