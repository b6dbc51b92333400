"""The local content-addressed blob store."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from registry.errors import PayloadTooLarge
from registry.storage.blobs import LocalBlobStore


def test_stage_commit_open(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"hello bricks" * 1000
    staged = store.stage(io.BytesIO(data), max_bytes=1 << 20, what="weights")
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.size == len(data)
    assert not store.exists(staged.sha256)  # staged bytes are not visible
    assert store.commit(staged) is True
    assert store.exists(staged.sha256)
    with store.open(staged.sha256) as handle:
        assert handle.read() == data
    assert store.verify(staged.sha256)
    assert list(store.digests()) == [staged.sha256]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_identical_bytes_are_stored_once(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    first = store.stage_bytes(b"same")
    second = store.stage_bytes(b"same")
    assert store.commit(first) is True
    assert store.commit(second) is False
    assert list(store.digests()) == [first.sha256]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_oversized_stream_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(PayloadTooLarge):
        store.stage(io.BytesIO(b"x" * 5000), max_bytes=4096, what="weights")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list(store.digests()) == []


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    staged = store.stage_bytes(b"original")
    store.commit(staged)
    path = store.path(staged.sha256)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert not store.verify(staged.sha256)


def test_paths_only_for_hex_digests(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, "abc"):
        with pytest.raises(ValueError):
            store.path(bad)


def test_sweep_removes_old_staging_files(tmp_path: Path) -> None:
    import os

    store = LocalBlobStore(tmp_path)
    staged = store.stage_bytes(b"left by a crash")
    os.utime(staged.path, (0, 0))
    fresh = store.stage_bytes(b"upload in progress")
    assert store.sweep_staging(older_than_s=60) == 1
    assert not staged.path.exists()
    assert fresh.path.exists()
