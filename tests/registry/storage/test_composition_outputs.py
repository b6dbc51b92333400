"""Composition outputs published to object storage (registry.storage.composition_outputs), on both
backends: ready only once every file is a verified blob, served from the manifest, a
failed upload leaves nothing ready, eviction deletes unused blobs, fsck sees lost files."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import pytest

from registry.builds.compositions import worker_name
from tests.conftest import brick_metadata, random_adapter

pytestmark = pytest.mark.parametrize("storage", ["s3"], indirect=True)


def _register(registry: Any, name: str, seed: int) -> Any:
    config, weights = random_adapter(seed)
    return registry.register_brick(brick_metadata(name), config, io.BytesIO(weights))


def _build(registry: Any, request: dict[str, Any]) -> Any:
    composition, _ = registry.compositions.request(request)
    claimed = registry.compositions.store.claim(composition.id, worker_name(0))
    return registry.compositions.build_claimed(claimed, worker_name(0))


@pytest.fixture
def bricks(registry: Any, llama_base: Path) -> Any:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    _register(registry, "a", 1)
    _register(registry, "b", 2)
    return registry


def test_outputs_are_blobs_listed_by_the_manifest_and_no_local_copy_remains(bricks: Any) -> None:
    built = _build(bricks, {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"})
    assert built.status == "ready", built.error
    assert not (bricks.compositions.root / built.id).exists()
    published = bricks.compositions.published(built.id)
    assert published is not None
    assert {f.path for f in published} >= {"adapter_config.json", "adapter_model.safetensors", "brickyard.json"}
    for file in published:
        with bricks.compositions.open_file(built.id, file.path) as handle:
            data = handle.read()
        assert hashlib.sha256(data).hexdigest() == file.sha256 and len(data) == file.size
        assert bricks.blobs.exists(file.sha256)
    assert sorted(bricks.compositions.files(built.id)) == sorted((f.path, f.size) for f in published)
    assert bricks.fsck().healthy and bricks.fsck().orphaned == []  # published blobs are referenced


def test_a_failed_upload_leaves_no_ready_composition_and_fsck_collects_the_uploaded(
    bricks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.errors import ServiceUnavailable

    real_commit = bricks.blobs.commit
    calls = []

    def commit_then_fail(staged: Any) -> bool:
        calls.append(staged.sha256)
        if len(calls) == 2:
            raise ServiceUnavailable("object storage refused the upload")
        return bool(real_commit(staged))

    monkeypatch.setattr(bricks.blobs, "commit", commit_then_fail)
    built = _build(bricks, {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"})
    assert built.status == "failed" and built.error_code == "service-unavailable"
    assert bricks.compositions.store.published_files(built.id) is None
    monkeypatch.undo()
    report = bricks.fsck()
    assert report.orphaned == [calls[0]]  # uploaded before the failure, referenced by nothing
    import registry.fsck

    monkeypatch.setattr(registry.fsck, "_now", lambda: time.time() + 7200)
    report = bricks.fsck(repair=True, grace_s=3600)
    assert f"blob {calls[0]}" in report.removed
    assert not bricks.blobs.exists(calls[0])


def test_eviction_deletes_the_blobs_no_one_else_uses(bricks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _build(bricks, {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"})
    first_files = bricks.compositions.published(first.id)
    assert first_files is not None
    budget = first.size_bytes + 1  # room for one composition
    monkeypatch.setattr(bricks.compositions.settings.compose, "cache_bytes", budget)
    second = _build(bricks, {"base_model": "tiny-llama", "bricks": [{"name": "b"}], "output": "adapter"})
    assert second.status == "ready"
    assert bricks.compositions.store.get(first.id) is None  # evicted: least recently used
    second_digests = {f.sha256 for f in bricks.compositions.published(second.id) or []}
    for file in first_files:
        assert bricks.blobs.exists(file.sha256) == (file.sha256 in second_digests), file.path
    assert bricks.fsck().orphaned == []


def test_fsck_reports_a_published_file_gone_and_forgets_the_composition(bricks: Any) -> None:
    built = _build(bricks, {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"})
    published = bricks.compositions.published(built.id)
    assert published is not None
    weights = next(f for f in published if f.path == "adapter_model.safetensors")
    bricks.blobs.delete(weights.sha256)
    report = bricks.fsck(repair=True, grace_s=0)
    assert report.missing == [f"{weights.sha256} (used by composition {built.id})"]
    assert report.composition_problems == [f"composition {built.id} is ready but its files are gone"]
    assert bricks.compositions.store.get(built.id) is None
    again, ready = bricks.compositions.request(
        {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"}
    )
    assert again.id == built.id and not ready  # queued to be built again
