"""fsck --repair never deletes the bytes of a brick registered while it runs (issue 15,
item 7): the race is driven deterministically with the hook between fsck's listing of
references and its deletions. Registration over HTTP, both databases."""

from __future__ import annotations

import hashlib
import io
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


@pytest.mark.parametrize("storage", ["s3"], indirect=True)
def test_composition_published_onto_an_old_orphan_during_fsck_keeps_its_bytes(
    registry: Any, llama_base: Path, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A composition's outputs deduplicate onto blobs an earlier build left unreferenced
    (its record forgotten); the rebuild is published and marked ready while fsck runs,
    between its listing and its deletions. Object storage keeps no age refresh on a
    deduplicated commit, so only the re-check inside the deletion's transaction, which must
    see ``compositions.files``, keeps the bytes."""
    import registry.fsck as fsck_module
    from registry.builds.compositions import worker_name

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    config, weights = random_adapter(21)
    registry.register_brick(brick_metadata("a"), config, io.BytesIO(weights))
    request = {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"}

    def build() -> Any:
        composition, _ = registry.compositions.request(request)
        claimed = registry.compositions.store.claim(composition.id, worker_name(0))
        return registry.compositions.build_claimed(claimed, worker_name(0))

    first = build()
    assert first.status == "ready", first.error
    files = {f.path: f for f in registry.compositions.published(first.id) or []}
    assert registry.compositions.store.delete_ready(first.id)  # its blobs are orphans now
    monkeypatch.setattr(fsck_module, "_now", lambda: time.time() + 7200)  # ...and old

    rebuilt: list[Any] = []
    report = registry.fsck(repair=True, grace_s=3600, after_listing=lambda: rebuilt.append(build()))
    assert rebuilt[0].status == "ready" and rebuilt[0].id == first.id, rebuilt[0].error
    assert files["adapter_model.safetensors"].sha256 in report.orphaned  # listed before the rebuild...
    assert not any(f.sha256 in removed for f in files.values() for removed in report.removed)  # ...kept
    for file in files.values():
        assert registry.blobs.exists(file.sha256), file.path
    from fastapi.testclient import TestClient

    from registry.api import create_app

    with TestClient(create_app(registry=registry), headers={"Authorization": f"Bearer {admin_token}"}) as http:
        response = http.get(f"/v1/compositions/{first.id}/files/adapter_model.safetensors")
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == files["adapter_model.safetensors"].sha256
    monkeypatch.undo()
    assert registry.fsck(verify=True).healthy


def _publishing_registry_build(registry: Any, composition_id: str) -> Any:
    from registry.builds.compositions import worker_name

    claimed = registry.compositions.store.claim(composition_id, worker_name(0))
    assert claimed is not None
    return registry.compositions.build_claimed(claimed, worker_name(0))


@pytest.mark.parametrize("storage", ["s3"], indirect=True)
def test_composition_whose_blob_was_collected_before_it_was_recorded_is_not_ready(
    registry: Any, llama_base: Path, monkeypatch: Any
) -> None:
    """The other interleaving: fsck deletes a blob after the build deduplicated onto it and
    before the manifest is recorded: the build fails with a clear message, never ready with
    a missing file."""
    import io

    from registry.builds import compositions as compositions_module

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
