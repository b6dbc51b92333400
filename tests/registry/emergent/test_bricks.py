"""`EmergentBricks` through the Python API (both backends): a job whose worker lost it stops
without registering anything; fsck keeps a discovery's probe blob; the Hub view does not list
discovery jobs as models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.registry.api.test_emergent import _discovery


@pytest.fixture
def queued(registry: Any, llama_base: Path) -> Any:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    job, ready = registry.emergent.request_discovery("tiny-llama", _discovery())
    assert not ready and job.status == "queued"
    return job


def test_a_discovery_whose_worker_lost_it_stops_and_registers_nothing(registry: Any, queued: Any) -> None:
    store = registry.compositions.store
    assert store.claim(queued.id, "host:1:0") is not None
    assert store.fail(queued.id, "host:1:0", "the build was interrupted", "interrupted")  # recovered meanwhile
    outcome = registry.emergent.run_claimed(queued, "host:1:0")
    assert (outcome.status, outcome.error_code) == ("failed", "interrupted")
    assert registry.list_bricks(kind="emergent").items == []


def test_fsck_keeps_probe_blobs_and_the_hub_view_skips_discovery_jobs(registry: Any, queued: Any) -> None:
    store = registry.compositions.store
    claimed = store.claim(queued.id, "host:1:0")
    done = registry.emergent.run_claimed(claimed, "host:1:0")
    assert done.status == "ready", done.error
    assert done.message == "registered code-neurons@1, prose-neurons@1"
    probes = queued.recipe["probes_sha256"]
    report = registry.fsck(repair=True, grace_s=0.0)
    assert probes not in report.orphaned and report.missing == [] and report.composition_problems == []
    assert registry.blobs.exists(probes)
    assert registry.ready_compositions() == []
    from registry.hub import Hub, RepoNotFound

    hub = Hub(registry)
    assert [m.repo_id for m in hub.list_models()] == ["base-models/tiny-llama"]
    with pytest.raises(RepoNotFound):
        hub.snapshot("bricks/code-neurons")
    # the same request again: already run, nothing queued
    again, ready = registry.emergent.request_discovery("tiny-llama", _discovery())
    assert ready and again.id == queued.id


def test_a_lape_discovery_of_the_same_functions_adds_versions(registry: Any, queued: Any) -> None:
    store = registry.compositions.store
    assert registry.emergent.run_claimed(store.claim(queued.id, "w:1:0"), "w:1:0").status == "ready"
    lape, _ = registry.emergent.request_discovery("tiny-llama", _discovery("lape"))
    assert lape.id != queued.id and lape.recipe["params"] == {
        "top_rate": 0.1,
        "filter_rate": 0.95,
        "activation_bar_ratio": 0.95,
    }
    done = registry.emergent.run_claimed(store.claim(lape.id, "w:1:0"), "w:1:0")
    assert done.status == "ready", done.error
    versions = registry.list_bricks(name="code-neurons", all_versions=True).items
    assert [(b.version, b.emergent["method"]) for b in versions] == [(2, "lape"), (1, "average_precision")]
    latest = registry.get_brick("code-neurons")
    table = latest.emergent["verification"]
    assert latest.version == 2 and set(table["base_loss"]) == {"code-neurons", "prose-neurons"}
    # LAPE selects top_rate of all neurons (lowest entropy) and shares them out: no more than that
    assert latest.emergent["neurons"] <= round(0.1 * 128)


def test_a_discovery_runs_in_a_build_process_of_a_live_server(live_server: Any, llama_base: Path) -> None:
    from tests.conftest import wait_ready

    with live_server.http() as http:
        assert http.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
        response = http.post("/v1/base-models/tiny-llama/emergent", json=_discovery())
        assert response.status_code == 202, response.text
        job = wait_ready(http, response.json()["id"], timeout_s=600)
        assert job["status"] == "ready", job
        names = [b["name"] for b in http.get("/v1/bricks", params={"kind": "emergent"}).json()["items"]]
        assert names == ["code-neurons", "prose-neurons"]
