"""A full disk is a 507 problem with nothing half-written (issue 15, item 9): the blob
store lives on a small tmpfs that is filled up before an upload. Both databases."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, random_adapter, register_base, upload


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=10)


def test_upload_onto_a_full_disk_is_507_and_leaves_nothing(settings: Any, llama_base: Path, full_disk: Path) -> None:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry

    small = settings.model_copy(update={"blob_dir": full_disk / "blobs"})
    registry = Registry.open(small)
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    try:
        with TestClient(
            create_app(registry=registry), raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            register_base(client, llama_base)
            config, weights = random_adapter(21, r=16)
            filler = full_disk / "filler"
            with open(filler, "wb") as handle, contextlib.suppress(OSError):  # less room than the weights need
                handle.write(b"\0" * (1024 * 1024 - len(weights) // 2))
            response = upload(client, config=config, weights=weights, metadata=brick_metadata("full"))
            assert response.status_code == 507, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"].endswith("/insufficient-storage")
            assert client.get("/v1/bricks/full").status_code == 404
            assert list((full_disk / "blobs" / "tmp").iterdir()) == []  # no half-written staging file
            assert not any(p.is_file() for p in (full_disk / "blobs").rglob("*") if "tmp" not in p.parts)
            # Space freed: the same upload goes through.
            filler.unlink()
            assert upload(client, config=config, weights=weights, metadata=brick_metadata("full")).status_code == 201
    finally:
        registry.close()
