"""``brickyard fsck`` on both backends and both blob storages (local directory, S3-compatible
object storage): missing, corrupt and orphaned bytes, staging leftovers, unfinished multipart
uploads and composition directories; repairs remove only what nothing references."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import brick_metadata, on_every_storage, random_adapter

pytestmark = on_every_storage


def _register(registry: Any, name: str, seed: int) -> Any:
    config, weights = random_adapter(seed)
    return registry.register_brick(brick_metadata(name), config, io.BytesIO(weights))


def _age(path: Path) -> None:
    os.utime(path, (1, 1))


def _overwrite(registry: Any, request: pytest.FixtureRequest, digest: str, data: bytes) -> None:
    """Replace a stored blob's bytes behind the store's back."""
    if registry.settings.blobs.url is None:
        path = registry.blobs.local_path(digest)
        path.chmod(0o644)
        path.write_bytes(data)
    else:  # the test's own client: the store's would refuse to overwrite (If-None-Match)
        client = request.getfixturevalue("s3_client")
        client.put_object(Bucket=registry.blobs.bucket, Key=registry.blobs.key(digest), Body=data)


def _two_hours_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsck's clock moves on: an object store's Last-Modified cannot be set back like an mtime."""
    import time

    import registry.fsck

    monkeypatch.setattr(registry.fsck, "_now", lambda: time.time() + 7200)


def test_healthy_registry(registry: Any, llama_base: Path) -> None:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    _register(registry, "a", 1)
    _register(registry, "b", 2)
    report = registry.fsck()
    assert report.healthy
    assert report.checked_blobs == 3  # two weights, one shared config
    assert (report.missing, report.corrupt, report.orphaned, report.staging_leftovers) == ([], [], [], [])


def test_missing_and_corrupt_blobs_are_reported_with_their_bricks(
    registry: Any, llama_base: Path, request: pytest.FixtureRequest
) -> None:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    a = _register(registry, "a", 1)
    b = _register(registry, "b", 2)
    registry.blobs.delete(a.sha256)
    _overwrite(registry, request, b.sha256, b"not the original bytes")
    report = registry.fsck(repair=True, grace_s=0)
    assert report.missing == [f"{a.sha256} (used by a@1)"]
    assert report.corrupt == [f"{b.sha256} (used by b@1)"]
    assert not report.healthy
    assert registry.blobs.exists(b.sha256)  # corrupt bytes are reported, never deleted
    assert registry.fsck(verify=False).corrupt == []  # --quick does not hash


def test_orphans_and_leftovers_are_collected_after_the_grace_period(
    registry: Any, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    kept = _register(registry, "kept", 1)
    deleted = _register(registry, "deleted", 2)
    registry.delete_brick("deleted", 1)
    crashed = registry.blobs.stage_bytes(b"bytes whose row was never written")
    registry.blobs.commit(crashed)
    leftover = registry.blobs.stage_bytes(b"an upload interrupted by a crash")
    report = registry.fsck(repair=True, grace_s=3600)
    assert sorted(report.orphaned) == sorted([deleted.sha256, crashed.sha256])
    assert report.staging_leftovers == [leftover.path.name]
    assert report.removed == []  # everything is younger than the grace period
    _two_hours_later(monkeypatch)
    report = registry.fsck(repair=True, grace_s=3600)
    assert len(report.removed) == 3
    assert not registry.blobs.exists(deleted.sha256) and not registry.blobs.exists(crashed.sha256)
    assert not leftover.path.exists()
    assert registry.blobs.exists(kept.sha256) and registry.blobs.exists(kept.config_sha256)
    assert registry.fsck().healthy


def test_composition_directories(registry: Any, llama_base: Path, storage: str) -> None:
    import shutil

    from registry.builds.compositions import worker_name

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    _register(registry, "a", 1)
    composition, _ = registry.compositions.request({"base_model": "tiny-llama", "bricks": [{"name": "a"}]})
    claimed = registry.compositions.store.claim(composition.id, worker_name(0))
    assert registry.compositions.build_claimed(claimed, worker_name(0)).status == "ready"
    stray = registry.compositions.root / ("f" * 64)
    stray.mkdir()
    half = registry.compositions.root / f".{'e' * 64}.composing-abc"
    half.mkdir()
    if storage == "local":
        shutil.rmtree(registry.compositions.root / composition.id)
    else:  # published to the bucket: one of its blobs goes
        published = registry.compositions.published(composition.id)
        registry.blobs.delete(next(f.sha256 for f in published if f.path == "brickyard.json"))
    for path in (stray, half):
        _age(path)
    report = registry.fsck(repair=True, grace_s=60)
    assert len(report.composition_problems) == 3
    assert not stray.exists() and not half.exists()
    assert registry.compositions.store.get(composition.id) is None
    assert registry.fsck().composition_problems == []


def test_fsck_cli_exit_code(monkeypatch: Any, registry: Any, settings: Any, llama_base: Path) -> None:
    from registry.cli.app import app

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    brick = _register(registry, "a", 1)
    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    if settings.blobs.url is not None:
        monkeypatch.setenv("BRICKYARD_BLOBS__URL", settings.blobs.url)
        monkeypatch.setenv("BRICKYARD_BLOBS__ENDPOINT_URL", settings.blobs.endpoint_url)
        monkeypatch.setenv("BRICKYARD_BLOBS__REGION", settings.blobs.region)
    runner = CliRunner()
    healthy = runner.invoke(app, ["fsck"])
    assert healthy.exit_code == 0, healthy.output
    assert "no missing or corrupt data" in healthy.output
    registry.blobs.delete(brick.sha256)
    broken = runner.invoke(app, ["fsck", "--quick"])
    assert broken.exit_code == 1
    assert "missing: 1" in broken.output


def test_unfinished_multipart_uploads_are_reported_and_aborted(
    registry: Any, llama_base: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    """A process killed mid multipart upload leaves parts and no object: reported, then aborted."""
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    _register(registry, "a", 1)
    if storage == "local":
        assert registry.fsck(repair=True, grace_s=0).stale_uploads == []  # a local upload is a staging file
        return
    client = request.getfixturevalue("s3_client")
    key = registry.blobs.key("d" * 64)
    upload = client.create_multipart_upload(Bucket=registry.blobs.bucket, Key=key)
    client.upload_part(Bucket=registry.blobs.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x")
    # Without repair (moto dates every upload 2010-11-10, so the grace period cannot be
    # shown on it; the store's own tests check sweeping by age).
    report = registry.fsck()
    assert report.stale_uploads == [f"{key} (upload {upload['UploadId']})"]
    assert report.removed == [] and report.healthy
    report = registry.fsck(repair=True, grace_s=0)
    assert report.removed == [f"stale upload {key}"]
    assert registry.fsck().stale_uploads == []
    assert not registry.blobs.exists("d" * 64)
