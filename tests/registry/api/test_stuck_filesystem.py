"""No request can stall the server (issue 15, item 2): base-model registration reads the
file system on its own few threads under a deadline. 45 registrations stuck in the file
system (a hung mount, simulated by blocking the read) answer 503 at the deadline, and
/healthz and listings answer meanwhile. Both databases."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def deadline_client(settings: Any) -> Any:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import LimitSettings

    short = settings.model_copy(update={"limits": LimitSettings(fs_deadline_s=0.5)})
    registry = Registry.open(short)
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    with TestClient(
        create_app(registry=registry), raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        yield client, registry
    registry.close()


def test_stuck_reads_answer_503_at_the_deadline_and_health_answers(
    deadline_client: Any, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import registry.service as service

    client, registry = deadline_client
    release = threading.Event()
    original = service.read_base_model

    def stuck_read(path: Path, **kwargs: Any) -> Any:
        release.wait(60)  # a read that hangs, like open() on a FIFO or a dead NFS mount
        return original(path, **kwargs)

    monkeypatch.setattr(service, "read_base_model", stuck_read)
    try:
        with ThreadPoolExecutor(45) as pool:
            started = time.monotonic()
            futures = [
                pool.submit(client.post, "/v1/base-models", json={"name": f"stuck-{i}", "path": str(llama_base)})
                for i in range(45)
            ]
            time.sleep(0.2)
            health = client.get("/healthz")
            listing = client.get("/v1/base-models")
            responses = [f.result(timeout=30) for f in futures]
            elapsed = time.monotonic() - started
        assert health.status_code == 200
        assert listing.status_code == 200
        assert {r.status_code for r in responses} == {503}
        assert responses[0].json()["type"].endswith("/service-unavailable")
        assert elapsed < 30, elapsed  # a stuck read waits 60 s: old code answered nothing until then
    finally:
        release.set()
        # Let the abandoned threads (the lane's 4) finish before the registry closes under them.
        deadline = time.monotonic() + 30
        while len(registry.list_base_models()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
