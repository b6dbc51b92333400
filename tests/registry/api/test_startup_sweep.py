"""Upload staging files left by a crash are swept when the server starts (issue 15, item
12); young ones (another process's upload in flight) stay. Both databases."""

from __future__ import annotations

import os
import time
from typing import Any


def test_stale_staging_files_are_swept_at_start_up(settings: Any) -> None:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry

    Registry.open(settings).close()  # creates the blob directories
    staging = settings.blob_root / "tmp"
    stale, young = staging / "upload-crashed", staging / "upload-in-flight"
    stale.write_bytes(b"x" * 1000)
    young.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert not stale.exists()
        assert young.exists()
