"""Registering, listing, reading, patching and deleting bricks over HTTP, on both backends,
with the blobs in the local directory and on S3-compatible object storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tests.conftest import blob_contents, brick_metadata, on_every_storage, register_base, upload

pytestmark = on_every_storage


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_brick_answers_201_with_the_stored_brick(
    client: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    response = upload(client, loras["r4"])
    assert response.status_code == 201, response.text
    brick = response.json()
    assert brick["name"] == "sentiment"
    assert brick["version"] == 1
    assert brick["base_model"] == "tiny-llama"
    assert brick["sha256"] == _sha(loras["r4"] / "adapter_model.safetensors")
    assert brick["config_sha256"] == _sha(loras["r4"] / "adapter_config.json")
    assert brick["rank"] == 4
    assert brick["lora_alpha"] == 8
    assert brick["use_rslora"] is False
    assert brick["target_modules"] == ["q_proj", "v_proj"]
    assert brick["module_count"] == 4  # 2 layers x 2 projections
    assert brick["size_bytes"] == (loras["r4"] / "adapter_model.safetensors").stat().st_size
    assert brick["tags"] == ["english", "sentiment"]
    assert brick["created_at"].endswith("Z") or "+00:00" in brick["created_at"]


def test_rslora_rank_pattern_and_other_ranks_register(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    rs = upload(client, loras["rslora"], metadata=brick_metadata("rs"))
    assert rs.status_code == 201, rs.text
    assert rs.json()["use_rslora"] is True
    pattern = upload(client, loras["pattern"], metadata=brick_metadata("pattern"))
    assert pattern.status_code == 201, pattern.text
    assert pattern.json()["rank_pattern"] == {"v_proj": 8, r"layers\.1\.mlp\.down_proj": 2}
    assert pattern.json()["alpha_pattern"] == {"down_proj": 4}
    assert pattern.json()["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    r8 = upload(client, loras["r8"], metadata=brick_metadata("r8"))
    assert r8.status_code == 201, r8.text
    assert r8.json()["rank"] == 8


def test_gpt2_conv1d_brick_registers(client: Any, gpt2_base: Path, gpt2_lora: Path) -> None:
    register_base(client, gpt2_base, name="tiny-gpt2")
    response = upload(client, gpt2_lora, metadata=brick_metadata("gpt-brick", base_model="tiny-gpt2"))
    assert response.status_code == 201, response.text
    assert response.json()["target_modules"] == ["c_attn", "c_proj"]


def test_versions_auto_increment_and_are_never_reused(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"]).json()["version"] == 1
    assert upload(client, loras["r8"]).json()["version"] == 2
    assert client.delete("/v1/bricks/sentiment/versions/2").status_code == 200
    assert upload(client, loras["rslora"]).json()["version"] == 3
    assert client.get("/v1/bricks/sentiment").json()["version"] == 3


def test_explicit_version_and_its_conflict(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    first = upload(client, loras["r4"], metadata=brick_metadata(version=7))
    assert first.status_code == 201
    assert first.json()["version"] == 7
    assert upload(client, loras["r8"]).json()["version"] == 8
    clash = upload(client, loras["rslora"], metadata=brick_metadata(version=7))
    assert clash.status_code == 409
    assert clash.headers["content-type"] == "application/problem+json"
    assert clash.json()["type"].endswith("/version-exists")


def test_same_weights_twice_is_409_naming_the_existing_brick(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"]).status_code == 201
    blobs_before = blob_contents(registry.blobs)
    assert len(blobs_before[0]) == 2
    again = upload(client, loras["r4"], metadata=brick_metadata("other-name"))
    assert again.status_code == 409
    body = again.json()
    assert body["type"].endswith("/brick-exists")
    assert body["existing"]["name"] == "sentiment"
    assert body["existing"]["version"] == 1
    assert "sentiment@1" in body["detail"]
    assert blob_contents(registry.blobs) == blobs_before
    assert client.get("/v1/bricks", params={"all_versions": True}).json()["items"].__len__() == 1


def test_get_latest_and_specific_versions(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    upload(client, loras["r4"])
    upload(client, loras["r8"])
    assert client.get("/v1/bricks/sentiment").json()["version"] == 2
    assert client.get("/v1/bricks/sentiment/versions/1").json()["rank"] == 4
    versions = client.get("/v1/bricks/sentiment/versions").json()["items"]
    assert [v["version"] for v in versions] == [2, 1]
    missing = client.get("/v1/bricks/sentiment/versions/9")
    assert missing.status_code == 404
    assert missing.json()["type"].endswith("/brick-not-found")
    assert client.get("/v1/bricks/nope").status_code == 404


def test_files_download_byte_identical(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    upload(client, loras["pattern"])
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        response = client.get(f"/v1/bricks/sentiment/versions/1/files/{filename}")
        assert response.status_code == 200
        assert response.content == (loras["pattern"] / filename).read_bytes()
    listing = client.get("/v1/bricks/sentiment/versions/1/files").json()
    assert {f["filename"] for f in listing} == {"adapter_config.json", "adapter_model.safetensors"}
    ranged = client.get(
        "/v1/bricks/sentiment/versions/1/files/adapter_model.safetensors", headers={"Range": "bytes=8-15"}
    )
    assert ranged.status_code == 206
    assert ranged.content == (loras["pattern"] / "adapter_model.safetensors").read_bytes()[8:16]


def test_file_paths_outside_the_brick_are_404(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    upload(client, loras["r4"])
    cases = {
        "..%2F..%2Fbrickyard.db": 404,  # a slash makes it another path, which no route serves
        "%2Fetc%2Fpasswd": 404,
        "adapter_model.safetensors%00": 422,  # not a file name: refused by the parameter's pattern
        "...": 404,  # a well-formed name that is not one of the brick's files
        "README.md": 404,
    }
    for bad, status in cases.items():
        response = client.get(f"/v1/bricks/sentiment/versions/1/files/{bad}")
        assert response.status_code == status, bad
        assert response.headers["content-type"] == "application/problem+json"


def test_unsatisfiable_range_is_416_problem(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    upload(client, loras["r4"])
    response = client.get(
        "/v1/bricks/sentiment/versions/1/files/adapter_config.json", headers={"Range": "bytes=999999-"}
    )
    assert response.status_code == 416
    assert response.json()["type"].endswith("/range-not-satisfiable")


def test_list_filters_and_cursor_pagination(
    client: Any, llama_base: Path, llama_base_single: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    register_base(client, llama_base_single, name="other-llama")
    upload(client, loras["r4"], metadata=brick_metadata("alpha", tags=["x"]))
    upload(client, loras["r8"], metadata=brick_metadata("beta", tags=["y"]))
    upload(client, loras["rslora"], metadata=brick_metadata("gamma", tags=["x"]))
    upload(client, loras["pattern"], metadata=brick_metadata("alpha", tags=["z"]))  # alpha@2
    names = [b["name"] for b in client.get("/v1/bricks").json()["items"]]
    assert names == ["alpha", "beta", "gamma"]
    # the tag filter looks at the latest version: alpha@2 no longer carries "x"
    tagged = client.get("/v1/bricks", params={"tag": "x"}).json()["items"]
    assert [(b["name"], b["version"]) for b in tagged] == [("gamma", 1)]
    assert client.get("/v1/bricks", params={"base_model": "other-llama"}).json()["items"] == []
    every = client.get("/v1/bricks", params={"all_versions": True}).json()["items"]
    assert [(b["name"], b["version"]) for b in every] == [("alpha", 2), ("alpha", 1), ("beta", 1), ("gamma", 1)]
    seen: list[tuple[str, int]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"all_versions": True, "limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/bricks", params=params).json()
        seen += [(b["name"], b["version"]) for b in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [(b["name"], b["version"]) for b in every]
    bad = client.get("/v1/bricks", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422
    assert bad.json()["errors"]


def test_patch_changes_description_examples_tags(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    upload(client, loras["r4"])
    response = client.patch(
        "/v1/bricks/sentiment/versions/1",
        json={"description": "detect sarcasm", "examples": ["oh great, another meeting"], "tags": ["Sarcasm"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["description"] == "detect sarcasm"
    assert body["examples"] == ["oh great, another meeting"]
    assert body["tags"] == ["sarcasm"]
    assert body["updated_at"] >= body["created_at"]
    assert client.get("/v1/bricks/sentiment/versions/1").json()["tags"] == ["sarcasm"]
    partial = client.patch("/v1/bricks/sentiment/versions/1", json={"tags": []})
    assert partial.json()["description"] == "detect sarcasm"
    assert partial.json()["tags"] == []
    unknown = client.patch("/v1/bricks/sentiment/versions/1", json={"sha256": "0" * 64})
    assert unknown.status_code == 422
    assert client.patch("/v1/bricks/sentiment/versions/5", json={"tags": []}).status_code == 404


def test_delete_removes_the_row_and_keeps_other_versions(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    upload(client, loras["r4"])
    upload(client, loras["r8"])
    response = client.delete("/v1/bricks/sentiment/versions/1")
    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert client.get("/v1/bricks/sentiment/versions/1").status_code == 404
    assert client.get("/v1/bricks/sentiment").json()["version"] == 2
    assert registry.store.count_bricks() == 1
    assert client.delete("/v1/bricks/sentiment/versions/1").status_code == 404


def test_metadata_fields_round_trip(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    meta = brick_metadata(license="apache-2.0", metrics={"accuracy": 0.91, "f1": 0.88}, examples=["a", "b"])
    body = upload(client, loras["r4"], metadata=meta).json()
    assert body["license"] == "apache-2.0"
    assert body["metrics"] == {"accuracy": 0.91, "f1": 0.88}
    assert body["examples"] == ["a", "b"]
    assert json.loads(json.dumps(body)) == client.get("/v1/bricks/sentiment/versions/1").json()
