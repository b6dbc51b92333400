"""Uploads are written once, from the request body into the blob store's staging, and the
bytes of uploads in flight together are bounded (issue 15, item 12). Over HTTP, both databases."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import brick_metadata, random_adapter, register_base, upload


def test_the_weights_go_from_the_body_to_the_blob_store_once(
    client: Any, registry: Any, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import starlette.formparsers

    register_base(client, llama_base)
    config, weights = random_adapter(51, r=16)
    spooled: list[int] = []
    real_spool = starlette.formparsers.SpooledTemporaryFile

    class CountingSpool(real_spool):  # type: ignore[misc, valid-type]
        def write(self, data: Any) -> int:
            spooled.append(len(data))
            return int(super().write(data))

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", CountingSpool)

    def no_second_copy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the upload was copied again into the blob store")

    monkeypatch.setattr(registry.blobs, "stage", no_second_copy)
    staged: list[Path] = []
    real_staging_file = registry.blobs.staging_file

    def recording_staging_file(**kwargs: Any) -> Any:
        file = real_staging_file(**kwargs)
        staged.append(file.path)
        return file

    monkeypatch.setattr(registry.blobs, "staging_file", recording_staging_file)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("once"))
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(weights).hexdigest()
    assert sum(spooled) < len(weights)  # only the small config part was spooled
    assert len(staged) == 1 and staged[0].parent == registry.blobs.root / "tmp"
    assert not staged[0].exists()  # committed (moved into place), not left behind
    assert client.get("/v1/bricks/once/versions/1/files/adapter_model.safetensors").content == weights


def test_a_refused_upload_leaves_no_staging_file(client: Any, registry: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(52)
    response = upload(client, config=config, weights=weights, metadata=brick_metadata("x", base_model="nope"))
    assert response.status_code == 422
    assert list((registry.blobs.root / "tmp").iterdir()) == []


@pytest.fixture
def budget_client(settings: Any, llama_base: Path) -> Iterator[tuple[TestClient, Any]]:
    """A server whose upload budget is 16 KiB."""
    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import LimitSettings

    small = settings.model_copy(update={"limits": LimitSettings(max_concurrent_upload_bytes=16 * 1024)})
    registry = Registry.open(small)
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    app = create_app(registry=registry)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}) as http:
        register_base(http, llama_base)
        yield http, app.state.upload_budget
    registry.close()


def test_an_upload_larger_than_the_budget_is_413(budget_client: Any) -> None:
    http, budget = budget_client
    config, weights = random_adapter(53, r=32)
    assert len(weights) > 16 * 1024
    response = upload(http, config=config, weights=weights, metadata=brick_metadata("big"))
    assert response.status_code == 413, response.text
    assert response.json()["type"].endswith("/payload-too-large")
    assert response.json()["limit_bytes"] == 16 * 1024
    assert budget.in_flight == 0


def test_an_upload_past_the_budget_in_flight_is_503_with_retry_after(budget_client: Any) -> None:
    http, budget = budget_client
    config, weights = random_adapter(54)
    # Another upload of 15 KiB is being received (held for this test).
    assert budget.reserve(15 * 1024)
    response = upload(http, config=config, weights=weights, metadata=brick_metadata("late"))
    assert response.status_code == 503, response.text
    assert response.json()["type"].endswith("/service-unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert http.get("/v1/bricks/late").status_code == 404
    budget.release(15 * 1024)  # that upload ended
    again = upload(http, config=config, weights=weights, metadata=brick_metadata("late"))
    assert again.status_code == 201, again.text
    assert budget.in_flight == 0  # every finished request gave its bytes back
