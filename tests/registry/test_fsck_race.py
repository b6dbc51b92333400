"""fsck --repair never deletes the bytes of a brick registered while it runs (issue 15,
item 7): the race is driven deterministically with the hook between fsck's listing of
references and its deletions. Registration over HTTP, both databases."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

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


def _publishing_registry_build(registry: Any, composition_id: str) -> Any:
    from registry.compositions import worker_name

    claimed = registry.compositions.store.claim(composition_id, worker_name(0))
    assert claimed is not None
    return registry.compositions.build_claimed(claimed, worker_name(0))


@pytest.mark.parametrize("storage", ["s3"], indirect=True)  # only the object store publishes outputs as blobs
def test_composition_published_onto_old_orphans_during_fsck_keeps_its_bytes(registry: Any, llama_base: Path) -> None:
    """fsck lists the blobs of a deleted composition as orphans; before it deletes them the
    same recipe is built again and published onto them (identical bytes: nothing uploaded).
    The deletion re-checks published manifests under the lock and keeps every blob."""
    import io

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    config, weights = random_adapter(21)
    registry.register_brick(brick_metadata("a"), config, io.BytesIO(weights))
    request = {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"}
    composition, _ = registry.compositions.request(request)
    assert _publishing_registry_build(registry, composition.id).status == "ready"
    digests = {f.sha256 for f in registry.compositions.published(composition.id) or ()}
    assert digests
    registry.compositions.delete(composition.id)

    rebuilt: list[Any] = []

    def rebuild_during_fsck() -> None:
        again, _ = registry.compositions.request(request)
        rebuilt.append(_publishing_registry_build(registry, again.id))

    report = registry.fsck(repair=True, grace_s=0, after_listing=rebuild_during_fsck)
    assert rebuilt[0].status == "ready", rebuilt[0].error
    assert digests <= set(report.orphaned)  # listed before the rebuild...
    assert all(registry.blobs.exists(d) for d in digests)  # ...and kept
    assert not [r for r in report.removed if any(d in r for d in digests)]
    after = registry.fsck(verify=True)
    assert after.healthy, after


@pytest.mark.parametrize("storage", ["s3"], indirect=True)
def test_composition_whose_blob_was_collected_before_it_was_recorded_is_not_ready(
    registry: Any, llama_base: Path, monkeypatch: Any
) -> None:
    """The other interleaving: fsck deletes a blob after the build deduplicated onto it and
    before the manifest is recorded: the build fails with a clear message, never ready with
    a missing file."""
    import io

    from registry import compositions as compositions_module

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    config, weights = random_adapter(22)
    registry.register_brick(brick_metadata("a"), config, io.BytesIO(weights))
    composition, _ = registry.compositions.request(
        {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"}
    )
    publish = compositions_module.publish_directory

    def publish_then_collect(blobs: Any, root: Path) -> Any:
        files = publish(blobs, root)
        blobs.delete(files[0].sha256)  # fsck won the race between the upload and the row
        return files

    monkeypatch.setattr(compositions_module, "publish_directory", publish_then_collect)
    built = _publishing_registry_build(registry, composition.id)
    assert built.status == "failed" and "collected" in (built.error or ""), built
    assert registry.compositions.store.published_files(composition.id) is None
