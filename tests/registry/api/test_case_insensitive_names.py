"""Names are unique case-insensitively (issue 15, item 12): base models, bricks, brick aliases
and composition names. The second spelling is a 409 ``name-taken`` problem naming the one
kept; lookups stay exact. Over HTTP, on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import brick_metadata, random_adapter, register_base, upload


def _assert_name_taken(response: Any, existing: str) -> None:
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"].endswith("/name-taken")
    assert problem["existing"] == existing
    assert repr(existing) in problem["detail"]


def test_a_base_model_name_in_another_case_is_refused(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base, name="tiny-llama")
    response = client.post("/v1/base-models", json={"name": "Tiny-Llama", "path": str(llama_base)})
    _assert_name_taken(response, "tiny-llama")
    assert [b["name"] for b in client.get("/v1/base-models").json()] == ["tiny-llama"]
    assert client.get("/v1/base-models/Tiny-Llama").status_code == 404  # lookups are exact


def test_a_brick_name_in_another_case_is_refused_and_nothing_is_recorded(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(31)
    assert upload(client, config=config, weights=weights, metadata=brick_metadata("fine")).status_code == 201
    other_config, other_weights = random_adapter(32)
    response = upload(client, config=other_config, weights=other_weights, metadata=brick_metadata("Fine"))
    _assert_name_taken(response, "fine")
    assert client.get("/v1/bricks/Fine").status_code == 404
    again = upload(client, config=other_config, weights=other_weights, metadata=brick_metadata("fine"))
    assert again.status_code == 201 and again.json()["version"] == 2  # the kept spelling still works


def test_a_brick_alias_in_another_case_is_refused_but_the_same_one_moves(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    for seed in (33, 34):
        config, weights = random_adapter(seed)
        assert upload(client, config=config, weights=weights, metadata=brick_metadata("fine")).status_code == 201
    assert client.put("/v1/bricks/fine/aliases/Prod", json={"version": 1}).status_code == 200
    _assert_name_taken(client.put("/v1/bricks/fine/aliases/prod", json={"version": 2}), "Prod")
    moved = client.put("/v1/bricks/fine/aliases/Prod", json={"version": 2})
    assert moved.status_code == 200 and moved.json()["version"] == 2
    assert [a["alias"] for a in client.get("/v1/bricks/fine/aliases").json()] == ["Prod"]


def test_a_composition_name_in_another_case_is_refused(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    config, weights = random_adapter(35)
    assert upload(client, config=config, weights=weights, metadata=brick_metadata("fine")).status_code == 201
    created = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "fine"}], "output": "adapter"}
    )
    assert created.status_code in (200, 201, 202), created.text
    composition_id = created.json()["id"]
    assert client.put("/v1/composition-names/Best", json={"composition": composition_id}).status_code == 200
    _assert_name_taken(client.put("/v1/composition-names/best", json={"composition": composition_id}), "Best")
    assert client.get("/v1/compositions/best").status_code == 404
    assert client.get("/v1/compositions/Best").json()["id"] == composition_id
