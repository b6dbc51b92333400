"""``/metrics`` scraped and parsed as Prometheus would, on both backends; ``/docs`` and
``/redoc`` served with packaged assets (no CDN)."""

from __future__ import annotations

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

    samples = _scrape(client)
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
