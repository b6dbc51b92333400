"""``/metrics`` scraped and parsed as Prometheus would, on both backends; ``/docs`` and
``/redoc`` served with packaged assets (no CDN)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import brick_metadata, register_base, upload, wait_ready


def _scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _wait_for(probe: Callable[[], Any]) -> Any:
    """Poll ``probe`` until it returns something (a generous bound against a hang, not a budget)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the state awaited was not reached")


def test_metrics_count_routes_search_stages_and_builds(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    for _ in range(3):
        assert client.get("/v1/bricks/nope").status_code == 404
    assert client.get("/v1/bricks/sentiment").status_code == 200
    assert client.post("/v1/search", json={"query": "review sentiment"}).status_code == 200
    queued = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"}
    )
    assert wait_ready(client, queued.json()["id"])["status"] == "ready"

    # The worker records a build after its status turns ready: wait for the record.
    built = ("brickyard_builds_total", (("status", "ready"),))
    samples = _wait_for(lambda: (lambda found: found if built in found else None)(_scrape(client)))
    route = "/v1/bricks/{name}"
    key = ("brickyard_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))
    assert samples[key] == 3  # by route template, not by raw path
    assert samples[("brickyard_http_requests_total", (("method", "GET"), ("route", route), ("status", "200")))] == 1
    assert samples[("brickyard_http_request_duration_seconds_count", (("method", "GET"), ("route", route)))] == 4
    assert not any("nope" in str(labels) for _, labels in samples)
    for stage in ("embed", "index", "rank"):
        assert samples[("brickyard_search_stage_seconds_count", (("stage", stage),))] == 1
    assert samples[("brickyard_builds_total", (("status", "ready"),))] == 1
    assert samples[("brickyard_build_duration_seconds_count", ())] == 1
    assert samples[("brickyard_compositions", (("status", "ready"),))] == 1
    assert samples[("brickyard_compositions", (("status", "queued"),))] == 0
    assert samples[("brickyard_composition_cache_bytes", ())] > 0
    assert ("brickyard_embedding_child_restarts", ()) in samples


def test_metrics_follow_the_read_guard(settings: Any) -> None:
    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import AuthSettings

    closed = settings.model_copy(update={"auth": AuthSettings(open_reads=False, bootstrap_admin=False)})
    registry = Registry.open(closed)
    try:
        token, _ = registry.tokens.create("scraper", "read", actor="tests")
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as anonymous:
            assert anonymous.get("/metrics").status_code == 401
            scraper = TestClient(anonymous.app, headers={"Authorization": f"Bearer {token}"})
            assert scraper.get("/metrics").status_code == 200
            anonymous_refusals = (
                "brickyard_http_requests_total",
                (("method", "GET"), ("route", "/metrics"), ("status", "401")),
            )
            assert _scrape(scraper)[anonymous_refusals] == 1
    finally:
        registry.close()


def test_docs_and_redoc_use_no_cdn(client: Any) -> None:
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert "http://" not in html.text and "https://" not in html.text.replace("https://fastapi", "")
        assert f"/docs-assets/{asset}" in html.text
        script = client.get(f"/docs-assets/{asset}")
        assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "Brickyard"


def _compose(client: Any, output: str) -> dict[str, Any]:
    queued = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": output}
    )
    assert queued.status_code in (200, 201, 202), queued.text
    done = wait_ready(client, queued.json()["id"])
    assert done["status"] == "ready", done
    return done


def _evictions(client: Any) -> tuple[float, float]:
    samples = _scrape(client)
    return samples[("brickyard_composition_evictions_total", ())], samples[
        ("brickyard_composition_evicted_bytes_total", ())
    ]


def test_an_eviction_counts_in_metrics(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path], monkeypatch: Any
) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    first = _compose(client, "adapter")
    assert _evictions(client) == (0, 0)
    monkeypatch.setattr(registry.settings.compose, "cache_bytes", 1)  # the next build evicts the first
    _compose(client, "full")  # ready, then it evicts the first: wait for that
    assert _wait_for(lambda: _evictions(client) == (1, first["size_bytes"]))
    assert client.get(f"/v1/compositions/{first['id']}").status_code == 404


def test_evictions_in_build_processes_count_in_the_servers_metrics(
    live_server: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    live_server.stop()
    live_server.env["BRICKYARD_COMPOSE__CACHE_BYTES"] = "1"  # every build evicts the one before
    live_server.start()
    with live_server.http() as http:
        register_base(http, llama_base)
        assert upload(http, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
        first = _compose(http, "adapter")
        second = _compose(http, "full")
        assert _wait_for(lambda: _evictions(http) == (1, first["size_bytes"]))
        assert http.get(f"/v1/compositions/{first['id']}").status_code == 404
        assert http.get(f"/v1/compositions/{second['id']}").status_code == 200
