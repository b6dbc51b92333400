"""Compatibility by fingerprint, base-model aliases and removal over HTTP; relative
``base_model_name_or_path``; duplicates judged on config and weights together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import brick_metadata, register_base, upload, wait_ready


def _with_config(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    data = json.loads((source / "adapter_config.json").read_text()) | changes
    (target / "adapter_config.json").write_text(json.dumps(data))
    return target


def test_a_brick_composes_on_every_base_model_of_its_fingerprint(
    client: Any, llama_base: Path, llama_base_single: Path, gpt2_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    # Other weights, one file instead of shards: the same config, tensor names, dtypes and shapes.
    same = register_base(client, llama_base_single, name="llama-twin")
    other = register_base(client, gpt2_base, name="tiny-gpt2")
    assert same["fingerprint"] == client.get("/v1/base-models/tiny-llama").json()["fingerprint"]
    assert other["fingerprint"] != same["fingerprint"]
    assert upload(client, loras["r4"]).status_code == 201

    response = client.post("/v1/compositions", json={"base_model": "llama-twin", "bricks": [{"name": "sentiment"}]})
    assert response.status_code == 202, response.text
    assert wait_ready(client, response.json()["id"])["status"] == "ready"
    assert response.json()["recipe"]["base_model"]["name"] == "llama-twin"

    refused = client.post("/v1/compositions", json={"base_model": "tiny-gpt2", "bricks": [{"name": "sentiment"}]})
    assert refused.status_code == 422 and refused.json()["type"].endswith("/incompatible-brick")
    assert refused.json()["errors"] == ["sentiment@1 is a brick of base model 'tiny-llama', whose fingerprint differs"]


def test_a_relative_base_path_matches_by_its_last_component_or_an_alias(
    client: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    assert llama_base.name == "llama"
    relative = _with_config(loras["r4"], tmp_path / "relative", base_model_name_or_path="models/llama")
    assert upload(client, relative).status_code == 201

    elsewhere = _with_config(loras["r8"], tmp_path / "elsewhere", base_model_name_or_path="checkpoints/my-llama")
    refused = upload(client, elsewhere, metadata=brick_metadata("elsewhere"))
    assert refused.status_code == 422
    (problem,) = refused.json()["errors"]
    assert "'checkpoints/my-llama'" in problem and "as an alias" in problem

    added = client.post("/v1/base-models/tiny-llama/aliases", json={"alias": "my-llama"})
    assert added.status_code == 200 and added.json()["aliases"] == ["my-llama"]
    assert upload(client, elsewhere, metadata=brick_metadata("elsewhere")).status_code == 201


def test_aliases_are_added_and_removed_over_http(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base, name="tiny-llama", aliases=["first"])
    for alias in ("org/tiny-llama", "org/tiny-llama"):  # adding an existing alias changes nothing
        response = client.post("/v1/base-models/tiny-llama/aliases", json={"alias": alias})
        assert response.status_code == 200 and response.json()["aliases"] == ["first", "org/tiny-llama"]
    removed = client.delete("/v1/base-models/tiny-llama/aliases/org/tiny-llama")
    assert removed.status_code == 200 and removed.json()["aliases"] == ["first"]
    again = client.delete("/v1/base-models/tiny-llama/aliases/org/tiny-llama")
    assert again.status_code == 404 and again.json()["errors"] == ["its aliases are ['first']"]
    for bad in ("", " padded", "tab\there", "x" * 301):
        assert client.post("/v1/base-models/tiny-llama/aliases", json={"alias": bad}).status_code == 422, bad
    assert client.post("/v1/base-models/nobody/aliases", json={"alias": "a"}).status_code == 404
    assert client.get("/v1/base-models/tiny-llama").json()["aliases"] == ["first"]


def test_a_base_model_is_removed_only_when_nothing_references_it(
    client: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    register_base(client, llama_base, name="spare")
    assert upload(client, loras["r4"]).status_code == 201
    composed = client.post("/v1/compositions", json={"base_model": "spare", "bricks": [{"name": "sentiment"}]})
    assert composed.status_code == 202

    in_use = client.delete("/v1/base-models/tiny-llama")
    assert in_use.status_code == 409 and in_use.json()["type"].endswith("/base-model-in-use")
    assert in_use.json()["errors"] == ["brick sentiment@1"]
    spare = client.delete("/v1/base-models/spare")
    assert spare.status_code == 409 and spare.json()["errors"] == [f"composition {composed.json()['id']}"]

    assert client.delete("/v1/bricks/sentiment/versions/1").status_code == 200
    removed = client.delete("/v1/base-models/tiny-llama")
    assert removed.status_code == 200 and removed.json()["name"] == "tiny-llama"
    assert client.get("/v1/base-models/tiny-llama").status_code == 404
    assert client.delete("/v1/base-models/tiny-llama").status_code == 404
    assert [b["name"] for b in client.get("/v1/base-models").json()] == ["spare"]


def test_the_same_weights_with_another_config_are_another_brick(
    client: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    assert upload(client, loras["r4"]).status_code == 201
    duplicate = upload(client, loras["r4"], metadata=brick_metadata("again"))
    assert duplicate.status_code == 409 and duplicate.json()["type"].endswith("/brick-exists")
    assert duplicate.json()["existing"]["name"] == "sentiment"

    corrected = _with_config(loras["r4"], tmp_path / "corrected", lora_alpha=2, use_rslora=True)
    response = upload(client, corrected)
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 2 and response.json()["use_rslora"] is True
    assert response.json()["sha256"] == client.get("/v1/bricks/sentiment/versions/1").json()["sha256"]


def test_a_brick_naming_a_base_of_the_same_fingerprint_registers_for_its_twin(
    client: Any, llama_base: Path, llama_base_single: Path, gpt2_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    register_base(client, gpt2_base, name="tiny-gpt2", aliases=["org/gpt2"])
    # trained on another directory of tiny-llama's fingerprint, registered for tiny-llama
    trained = _with_config(loras["r4"], tmp_path / "trained", base_model_name_or_path=str(llama_base_single))
    unknown = upload(client, trained)
    assert unknown.status_code == 422 and "as an alias" in unknown.json()["errors"][0]
    register_base(client, llama_base_single, name="llama-twin")
    assert upload(client, trained).status_code == 201
    # a name of a base with another fingerprint is still refused, with the alias hint
    other = _with_config(loras["r8"], tmp_path / "other", base_model_name_or_path="org/gpt2")
    response = upload(client, other, metadata=brick_metadata("other"))
    assert response.status_code == 422
    assert [p for p in response.json()["errors"] if "base_model_name_or_path" in p] == [
        "adapter_config: base_model_name_or_path is 'org/gpt2' but the brick is registered for base model "
        f"'tiny-llama' (path {str(llama_base.resolve())!r}); if they are the same model, register the base model "
        "with that name as an alias"
    ]


def test_uploads_are_checked_against_the_recorded_shapes_when_the_base_directory_is_gone(
    client: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    moved = tmp_path / "llama"
    shutil.copytree(llama_base, moved)
    register_base(client, moved, name="tiny-llama")
    shutil.rmtree(moved)
    fine = _with_config(loras["r4"], tmp_path / "fine", base_model_name_or_path=None)
    response = upload(client, fine)
    assert response.status_code == 201, response.text
    wrong_rank = _with_config(loras["r8"], tmp_path / "wrong", r=4, lora_alpha=8, base_model_name_or_path=None)
    refused = upload(client, wrong_rank, metadata=brick_metadata("wrong"))
    assert refused.status_code == 422
    assert any("lora_A has shape [8, 32], expected [4, 32]" in p for p in refused.json()["errors"])


def test_instruction_search_finds_the_bricks_of_a_fingerprint_twin(
    client: Any, llama_base: Path, llama_base_single: Path, gpt2_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base, name="tiny-llama")
    register_base(client, llama_base_single, name="llama-twin")
    register_base(client, gpt2_base, name="tiny-gpt2")
    # One brick registered against each twin: each is found, and composed, on the other.
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment", base_model="tiny-llama")).status_code == 201
    summary = brick_metadata(
        "summarize",
        base_model="llama-twin",
        description="summarize a long news article in two sentences",
        examples=["The council met on Tuesday to discuss the new budget for the city's parks."],
        tags=["summarization"],
    )
    assert upload(client, loras["r8"], metadata=summary).status_code == 201

    def found(base_model: str, query: str, **options: Any) -> list[str]:
        request = {"query": query, "base_model": base_model, "k": 5, **options}
        response = client.post("/v1/search", json=request)
        assert response.status_code == 200, response.text
        return [hit["brick"]["name"] for hit in response.json()["hits"]]

    # The plain filter is by registered name; `compatible` widens it to the fingerprint.
    assert found("llama-twin", "classify the sentiment of a review") == ["summarize"]
    compatible = found("llama-twin", "classify the sentiment of a review", compatible=True)
    assert sorted(compatible) == ["sentiment", "summarize"]
    assert sorted(found("tiny-llama", "summarize this article", compatible=True)) == ["sentiment", "summarize"]
    assert found("tiny-gpt2", "classify the sentiment of a review", compatible=True) == []

    for base_model, instruction, brick in (
        ("llama-twin", "classify the sentiment of this product review", "sentiment"),
        ("tiny-llama", "summarize this long news article in two sentences", "summarize"),
    ):
        request = {"base_model": base_model, "instruction": instruction, "k": 1}
        response = client.post("/v1/compositions", json=request)
        assert response.status_code == 202, response.text
        recipe = response.json()["recipe"]
        assert recipe["base_model"]["name"] == base_model
        assert [b["name"] for b in recipe["bricks"]] == [brick]
        assert wait_ready(client, response.json()["id"])["status"] == "ready"

    # A base of another fingerprint still finds none of them to compose.
    refused = client.post("/v1/compositions", json={"base_model": "tiny-gpt2", "instruction": "classify sentiment"})
    assert refused.status_code == 422, refused.text
    assert "no brick of base model 'tiny-gpt2' matches the instruction" in refused.json()["detail"]
