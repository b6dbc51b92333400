"""A fresh server loads its embedding model at start-up, in the background (issue #21, item 5):
``/healthz`` and ``/readyz`` answer during the load, ``/readyz?embedder=true`` waits for it,
and the first search finds the model loaded. Both backends (the registry fixtures)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.registry.api.test_metrics_and_docs import _scrape


class _GatedEmbedder:
    """An embedder whose first embedding waits for ``gate`` (a model still loading), or fails."""

    name = "gated-test-embedder"
    dim = 4

    def __init__(self, *, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.fail = fail
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_with_layer(texts)[0]

    def embed_with_layer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        self.gate.wait()
        if self.fail:
            raise RuntimeError("no such model")
        vectors = np.tile(np.array([1, 0, 0, 0], np.float32), (len(texts), 1))
        return vectors, vectors


@contextmanager
def _app_with(settings: Any, embedder: Any) -> Iterator[TestClient]:
    from registry.api import create_app
    from registry.service import Registry
    from registry.storage.store import Store

    opened = Registry.open(settings)
    registry = Registry(settings, Store(opened.store.db), opened.blobs, embedder=embedder)
    try:
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as client:
            yield client
    finally:
        embedder.gate.set()  # let a warm-up thread still waiting finish
        opened.close()


def _wait_until_not_loading(client: TestClient) -> dict[str, Any]:
    """Poll the state (a generous bound only against a hang, never a budget)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get("/readyz").json()
        if body["embedder"] != "loading":
            return body
        time.sleep(0.05)
    raise AssertionError("the embedder warm-up did not finish")


@pytest.fixture
def gated(settings: Any) -> Iterator[tuple[TestClient, _GatedEmbedder]]:
    embedder = _GatedEmbedder()
    with _app_with(settings, embedder) as client:
        yield client, embedder


def test_health_answers_while_the_embedder_loads_and_readiness_can_wait(
    gated: tuple[TestClient, _GatedEmbedder],
) -> None:
    client, embedder = gated
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["embedder"] == "loading"
    waiting = client.get("/readyz", params={"embedder": "true"})
    assert waiting.status_code == 503
    assert waiting.headers["content-type"].startswith("application/problem+json")
    assert "loading" in waiting.json()["detail"]
    embedder.gate.set()
    assert _wait_until_not_loading(client)["embedder"] == "ready"
    assert client.get("/readyz", params={"embedder": "true"}).json()["embedder"] == "ready"
    assert embedder.calls == 1  # the warm-up's query; no search has run
    assert not any(name == "brickyard_search_stage_seconds_count" for name, _ in _scrape(client))


def test_an_embedder_that_cannot_load_does_not_hold_readiness(settings: Any) -> None:
    embedder = _GatedEmbedder(fail=True)
    embedder.gate.set()
    with _app_with(settings, embedder) as client:
        assert _wait_until_not_loading(client)["embedder"] == "unavailable"
        assert client.get("/readyz", params={"embedder": "true"}).status_code == 200


def test_a_fresh_server_loads_the_real_model_before_its_first_search(settings: Any, tmp_path: Path) -> None:
    """The default embedder, from an export cache of its own (a copy of the session's export,
    so that this process has not loaded it yet): the start-up loads it, no search asked."""
    from registry.api import create_app
    from registry.search.embed import shared_embedder
    from registry.service import Registry

    embedding = settings.embedding
    exported = shared_embedder(
        embedding.resolved_model_path(), cache_dir=settings.embedding_cache_dir, threads=embedding.threads
    )
    exported.embed(["export once for the session"])
    fresh_cache = tmp_path / "fresh-cache"
    shutil.copytree(settings.embedding_cache_dir / exported.name, fresh_cache / exported.name)
    own = settings.model_copy(update={"embedding": embedding.model_copy(update={"cache_dir": fresh_cache})})
    registry = Registry.open(own)
    try:
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as client:
            assert _wait_until_not_loading(client)["embedder"] == "ready"
            loaded = registry.embedder
            assert loaded is not exported and loaded.name == exported.name
            assert getattr(loaded, "_session", None) is not None  # loaded by the start-up alone
            assert not any(name == "brickyard_search_stage_seconds_count" for name, _ in _scrape(client))
            assert client.post("/v1/search", json={"query": "classify reviews"}).status_code == 200
    finally:
        registry.close()
