"""Compositions as managed resources over HTTP on both backends: listing (filters, cursor
pages), names, cancel (queued and running: nothing half-written), delete (also while a
file is being downloaded); brick version aliases in REST, compose and the Hub view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, register_base, upload, wait_ready


@pytest.fixture
def catalog(client: Any, llama_base: Path, loras: dict[str, Path]) -> Any:
    register_base(client, llama_base)
    for name, path in (("sentiment", loras["r4"]), ("sentiment", loras["r8"]), ("summarize", loras["pattern"])):
        response = upload(client, path, metadata=brick_metadata(name, description=f"{name} things"))
        assert response.status_code == 201, response.text
    return client


def _compose(client: Any, *bricks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {"base_model": "tiny-llama", "bricks": list(bricks), "output": "adapter", **extra}
    response = client.post("/v1/compositions", json=body)
    assert response.status_code in (200, 202), response.text
    return wait_ready(client, response.json()["id"])


def test_list_filters_and_pages_by_cursor(catalog: Any) -> None:
    a = _compose(catalog, {"name": "sentiment", "version": 1})
    b = _compose(catalog, {"name": "summarize"})
    c = _compose(catalog, {"name": "sentiment", "version": 2}, {"name": "summarize", "weight": 0.5})
    assert {x["status"] for x in (a, b, c)} == {"ready"}

    everything = catalog.get("/v1/compositions").json()
    assert [x["id"] for x in everything["items"]] == [c["id"], b["id"], a["id"]]  # newest first
    assert everything["next_cursor"] is None

    seen, cursor = [], None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = catalog.get("/v1/compositions", params=params).json()
        assert len(page["items"]) == 1
        seen.append(page["items"][0]["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [c["id"], b["id"], a["id"]]

    by_brick = catalog.get("/v1/compositions", params={"brick": "summarize"}).json()["items"]
    assert {x["id"] for x in by_brick} == {b["id"], c["id"]}
    assert catalog.get("/v1/compositions", params={"status": "failed"}).json()["items"] == []
    ready = catalog.get("/v1/compositions", params={"base_model": "tiny-llama", "status": "ready"}).json()
    assert len(ready["items"]) == 3
    assert catalog.get("/v1/compositions", params={"base_model": "nope"}).status_code == 404
    bad = catalog.get("/v1/compositions", params={"status": "sleeping"})
    assert bad.status_code == 422 and "cancelled" in bad.json()["errors"][0]
    assert catalog.get("/v1/compositions", params={"cursor": "garbage"}).status_code == 422


def test_names_point_at_compositions_and_are_accepted_as_ids(catalog: Any) -> None:
    a = _compose(catalog, {"name": "sentiment", "version": 1})
    b = _compose(catalog, {"name": "summarize"})
    named = catalog.put("/v1/composition-names/support-bot", json={"composition": a["id"]})
    assert named.status_code == 200 and named.json()["names"] == ["support-bot"]
    assert catalog.get("/v1/compositions/support-bot").json()["id"] == a["id"]
    files = catalog.get("/v1/compositions/support-bot/files").json()
    assert "adapter_model.safetensors" in {f["path"] for f in files}
    listed = catalog.get("/v1/compositions", params={"name": "support-bot"}).json()["items"]
    assert [x["id"] for x in listed] == [a["id"]]

    # setting it again moves it
    catalog.put("/v1/composition-names/support-bot", json={"composition": b["id"]})
    assert catalog.get("/v1/compositions/support-bot").json()["id"] == b["id"]
    assert catalog.get(f"/v1/compositions/{a['id']}").json()["names"] == []

    assert catalog.put("/v1/composition-names/x", json={"composition": "no-such-name"}).status_code == 404
    assert catalog.put("/v1/composition-names/" + "a" * 64, json={"composition": b["id"]}).status_code == 422
    assert catalog.delete("/v1/composition-names/support-bot").json()["id"] == b["id"]
    assert catalog.get("/v1/compositions/support-bot").status_code == 404


def test_cancel_a_queued_build_then_request_it_again(registry: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    from registry.client import LocalClient

    local = LocalClient(registry)
    local.add_base_model("tiny-llama", str(llama_base))
    local.register_brick(loras["r4"], brick_metadata("sentiment"))
    queued = local.compose({"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"})
    cancelled = registry.compositions.cancel(queued.id, actor="tests")
    assert (cancelled.status, cancelled.error_code) == ("cancelled", "cancelled")
    assert registry.compositions.store.claim_next("w") is None  # no worker picks it up
    again, ready = registry.compositions.request(
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"}
    )
    assert again.id == queued.id and again.status == "queued" and not ready


def test_cancel_stops_a_running_build_and_leaves_no_files(
    registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    from registry.client import LocalClient

    local = LocalClient(registry)
    local.add_base_model("tiny-llama", str(llama_base))
    local.register_brick(loras["r4"], brick_metadata("sentiment"))
    queued = local.compose({"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]})
    claimed = registry.compositions.store.claim(queued.id, "worker-a")
    assert claimed.status == "running"
    registry.compositions.cancel(queued.id, actor="tests")  # lands while the worker is about to build
    outcome = registry.compositions.build_claimed(claimed, "worker-a")
    assert outcome.status == "cancelled"
    root = registry.settings.compositions_dir
    assert list(root.iterdir()) == []  # no directory, no staging leftover


def test_cancel_and_delete_over_http(catalog: Any, registry: Any) -> None:
    ready = _compose(catalog, {"name": "sentiment", "version": 1})
    refused = catalog.post(f"/v1/compositions/{ready['id']}/cancel")
    assert refused.status_code == 409 and "ready" in refused.json()["detail"]
    catalog.put("/v1/composition-names/keep", json={"composition": ready["id"]})
    path = registry.settings.compositions_dir / ready["id"]
    assert path.is_dir()

    gone = catalog.delete("/v1/compositions/keep")  # by name
    assert gone.status_code == 200 and gone.json()["id"] == ready["id"]
    assert not path.exists()
    assert list(registry.settings.compositions_dir.iterdir()) == []
    assert catalog.get(f"/v1/compositions/{ready['id']}").status_code == 404
    assert catalog.get("/v1/compositions/keep").status_code == 404
    assert catalog.get(f"/v1/compositions/{ready['id']}/files").status_code == 404
    assert catalog.delete(f"/v1/compositions/{ready['id']}").status_code == 404
    # requested again, it is built again
    assert _compose(catalog, {"name": "sentiment", "version": 1})["status"] == "ready"


def test_a_download_under_way_survives_a_delete(catalog: Any, registry: Any) -> None:
    """What a file response does (open, then stream) finishes after the composition is deleted."""
    ready = _compose(catalog, {"name": "sentiment", "version": 1})
    local = registry.compositions.file(ready["id"], "adapter_model.safetensors")
    expected = local.read_bytes()
    with open(local, "rb") as streaming:
        first = streaming.read(100)
        registry.compositions.delete(ready["id"], actor="tests")
        assert not local.exists()
        rest = streaming.read()
    assert first + rest == expected


def test_brick_aliases_in_rest_compose_and_the_hub(catalog: Any) -> None:
    set_alias = catalog.put("/v1/bricks/sentiment/aliases/production", json={"version": 1})
    assert set_alias.status_code == 200 and set_alias.json()["version"] == 1
    assert catalog.get("/v1/bricks/sentiment/versions/production").json()["version"] == 1
    assert catalog.get("/v1/bricks/sentiment/versions/latest").json()["version"] == 2
    files = catalog.get("/v1/bricks/sentiment/versions/production/files").json()
    assert {f["filename"] for f in files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert [a["alias"] for a in catalog.get("/v1/bricks/sentiment/aliases").json()] == ["production"]

    by_alias = _compose(catalog, {"name": "sentiment", "version": "production"})
    by_number = _compose(catalog, {"name": "sentiment", "version": 1})
    assert by_alias["id"] == by_number["id"]  # the recipe records the resolved version
    assert by_alias["recipe"]["bricks"][0]["version"] == 1

    # the Hub view resolves the alias as a revision
    hub = catalog.get("/api/models/bricks/sentiment/revision/production")
    assert hub.status_code == 200, hub.text
    assert hub.json()["sha"] == catalog.get("/api/models/bricks/sentiment/revision/1").json()["sha"]
    assert hub.json()["sha"] != catalog.get("/api/models/bricks/sentiment/revision/2").json()["sha"]

    # moving it
    catalog.put("/v1/bricks/sentiment/aliases/production", json={"version": 2})
    assert catalog.get("/v1/bricks/sentiment/versions/production").json()["version"] == 2
    assert catalog.put("/v1/bricks/sentiment/aliases/staging", json={"version": "production"}).json()["version"] == 2

    missing = catalog.get("/v1/bricks/sentiment/versions/canary")
    assert missing.status_code == 404 and "production, staging" in missing.json()["errors"][0]
    for bad in ("7", "latest", "main"):
        assert catalog.put(f"/v1/bricks/sentiment/aliases/{bad}", json={"version": 1}).status_code == 422
    assert catalog.put("/v1/bricks/sentiment/aliases/x", json={"version": 9}).status_code == 404
    assert catalog.put("/v1/bricks/nope/aliases/x", json={"version": 1}).status_code == 404
    bad_compose = catalog.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment", "version": "canary"}]}
    )
    assert bad_compose.status_code == 404 and "canary" in bad_compose.json()["detail"]
    assert catalog.delete("/v1/bricks/sentiment/aliases/production").status_code == 200
    assert catalog.get("/v1/bricks/sentiment/versions/production").status_code == 404
    assert catalog.delete("/v1/bricks/sentiment/aliases/production").status_code == 404


def test_every_problem_of_a_request_is_reported_with_did_you_mean(catalog: Any) -> None:
    body = {
        "base_model": "tiny-llama",
        "bricks": [{"name": "sumarize"}, {"name": "nope"}, {"name": "sentiment"}],
        "method": "ties",
        "params": {"density": 3, "majority_sign": "total"},
    }
    answer = catalog.post("/v1/compositions", json=body)
    assert answer.status_code == 422, answer.text
    problems = answer.json()["errors"]
    assert len(problems) == 4, problems
    assert any(p.startswith("bricks[0]:") and "did you mean 'summarize'" in p for p in problems)
    assert any(p.startswith("bricks[1]:") and "did you mean" not in p for p in problems)
    assert any(p.startswith("params.density:") for p in problems)
    assert any(p.startswith("params.majority_sign:") and "did you mean 'majority_sign_method'" in p for p in problems)

    method = catalog.post("/v1/compositions", json={**body, "bricks": [{"name": "sentiment"}], "method": "tis"})
    assert method.status_code == 422 and "did you mean 'ties'" in method.json()["errors"][0]

    unknown = catalog.post("/v1/compositions", json={"base_model": "tiny-lama", "bricks": [{"name": "sumarize"}]})
    assert unknown.status_code == 404  # only unknown names: not found, every one listed
    assert len(unknown.json()["errors"]) == 2 and "did you mean 'tiny-llama'" in unknown.json()["errors"][0]
    assert catalog.get("/v1/compositions").json()["items"] == []  # nothing was queued


def test_a_cached_recipe_is_answered_without_planning_again(
    registry: Any, llama_base: Path, loras: dict[str, Path], monkeypatch: Any
) -> None:
    import composer
    from registry.client import LocalClient

    local = LocalClient(registry)
    local.add_base_model("tiny-llama", str(llama_base))
    local.register_brick(loras["r4"], brick_metadata("sentiment"))
    request = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"}
    built = local.wait_composition(local.compose(request).id)
    assert built.status == "ready"

    def no_planning(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a built recipe was planned again")

    monkeypatch.setattr(composer, "plan_composition", no_planning)
    again, ready = registry.compositions.request(request)
    assert ready and again.id == built.id
    with pytest.raises(AssertionError, match="planned again"):  # a new recipe is still planned
        registry.compositions.request({**request, "bricks": [{"name": "sentiment", "weight": 0.5}]})


def test_remote_download_reports_bytes(catalog: Any, tmp_path: Path) -> None:
    from registry.client import RemoteClient

    ready = _compose(catalog, {"name": "sentiment", "version": 1})
    remote = RemoteClient("http://testserver", http=catalog)
    seen: list[tuple[int, int]] = []
    paths = remote.download_composition(ready["id"], tmp_path / "out", lambda done, total: seen.append((done, total)))
    size = sum(p.stat().st_size for p in paths)
    assert seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
