"""fsck --repair never deletes the bytes of a brick registered while it runs (issue 15,
item 7): the race is driven deterministically with the hook between fsck's listing of
references and its deletions. Registration over HTTP, both databases."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.conftest import brick_metadata, random_adapter, register_base, upload


def _age(path: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_registration_deduplicating_onto_an_old_orphan_during_fsck_keeps_its_bytes(
    client: Any, registry: Any, llama_base: Path
) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(11)
    first = upload(client, config=config, weights=weights, metadata=brick_metadata("race"))
    assert first.status_code == 201
    sha256, config_sha256 = first.json()["sha256"], first.json()["config_sha256"]
    assert client.delete("/v1/bricks/race/versions/1").status_code == 200
    for digest in (sha256, config_sha256):  # orphans, older than the grace period
        _age(Path(registry.blobs.path(digest)))

    registered: list[Any] = []

    def register_during_fsck() -> None:
        registered.append(upload(client, config=config, weights=weights, metadata=brick_metadata("race")))

    report = registry.fsck(repair=True, grace_s=3600, after_listing=register_during_fsck)
    assert registered[0].status_code == 201, registered[0].text
    assert registered[0].json()["version"] == 2
    assert sha256 in report.orphaned  # listed before the registration...
    assert not any(sha256 in removed or config_sha256 in removed for removed in report.removed)  # ...kept
    assert client.get("/v1/bricks/race/versions/2/files/adapter_model.safetensors").content == weights
    assert registry.fsck(verify=True).healthy


def test_an_orphan_nobody_claims_is_still_collected(client: Any, registry: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(12)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("gone"))
    sha256 = response.json()["sha256"]
    assert client.delete("/v1/bricks/gone/versions/1").status_code == 200
    _age(Path(registry.blobs.path(sha256)))
    report = registry.fsck(repair=True, grace_s=3600)
    assert f"blob {sha256}" in report.removed
    assert not registry.blobs.exists(sha256)


def test_registration_whose_bytes_were_collected_records_nothing(
    client: Any, registry: Any, llama_base: Path, monkeypatch: Any
) -> None:
    """The other interleaving: the blob is deleted after the registration's deduplication
    but before its row: the registration answers 503 and records no row (never a 201
    without bytes)."""
    register_base(client, llama_base)
    config, weights = random_adapter(13)
    first = upload(client, config=config, weights=weights, metadata=brick_metadata("late"))
    sha256 = first.json()["sha256"]
    assert client.delete("/v1/bricks/late/versions/1").status_code == 200
    original = registry.store.add_brick

    def add_brick_after_collection(*args: Any, **kwargs: Any) -> Any:
        registry.blobs.delete(sha256)  # fsck won the race between commit and row
        return original(*args, **kwargs)

    monkeypatch.setattr(registry.store, "add_brick", add_brick_after_collection)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("late"))
    assert response.status_code == 503, response.text
    assert client.get("/v1/bricks/late/versions/2").status_code == 404
