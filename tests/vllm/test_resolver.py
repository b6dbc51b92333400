"""vLLM's OpenAI server resolving Brickyard bricks by reference, compared token for token with
transformers + PEFT (greedy, float32)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.vllm.conftest import BASE, BRICKS, OTHER_BASE, Stack, greedy_reference


def test_a_brick_requested_by_name_matches_transformers_and_peft(stack: Stack) -> None:
    expected = greedy_reference(stack.base, stack.adapters["alpha"])
    assert stack.tokens("alpha") == expected
    # The brick changes the answer: the equality above says something about the adapter.
    assert stack.tokens(str(stack.base)) == greedy_reference(stack.base, None) != expected


def test_name_at_version_is_the_same_adapter(stack: Stack) -> None:
    assert stack.tokens("beta@1") == stack.tokens("beta") == greedy_reference(stack.base, stack.adapters["beta"])
    assert stack.tokens("beta@1") != stack.tokens("alpha")


def test_a_brick_registered_after_vllm_started_is_served_without_restart(stack: Stack) -> None:
    missing = stack.complete("late")
    assert missing.status_code == 404, missing.text
    stack.register_brick("late", stack.adapters["late"])
    # vLLM remembered nothing about the failed lookup: the next request resolves it.
    assert stack.tokens("late") == greedy_reference(stack.base, stack.adapters["late"])


def test_a_deleted_brick_is_refused_even_once_vllm_has_loaded_it(stack: Stack) -> None:
    brick = stack.register_brick("gone", stack.adapters["gone"])
    models = ("gone", f"gone@{brick['version']}")
    expected = greedy_reference(stack.base, stack.adapters["gone"])
    for model in models:  # asked of vLLM directly: it resolves and keeps both names
        assert stack.tokens(model) == expected
    loaded = {m["id"] for m in httpx.get(f"{stack.vllm_url}/v1/models", timeout=30).json()["data"]}
    assert set(models) <= loaded
    # Brickyard (serve.engine = vllm) unloads the brick from vLLM before answering the deletion.
    deleted = stack.brickyard.delete(f"/v1/bricks/gone/versions/{brick['version']}")
    assert deleted.status_code == 200, deleted.text
    loaded = {m["id"] for m in httpx.get(f"{stack.vllm_url}/v1/models", timeout=30).json()["data"]}
    assert not set(models) & loaded
    for model in models:
        response = stack.complete(model)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == 404
    assert stack.tokens("alpha") == greedy_reference(stack.base, stack.adapters["alpha"])  # others unaffected


def test_a_brick_of_another_base_is_refused_by_fingerprint(stack: Stack) -> None:
    stack.register_brick("foreign", stack.adapters["foreign"], base_model=OTHER_BASE)
    response = stack.complete("foreign")
    assert response.status_code == 404, response.text
    log = stack.vllm_log.read_text()
    assert "Brickyard adapter 'foreign' refused" in log and "fingerprint" in log


def test_unknown_models_are_not_found(stack: Stack) -> None:
    for model in ("no-such-brick", "alpha@99", "0" * 64, "not a reference"):
        response = stack.complete(model)
        assert response.status_code == 404, (model, response.text)


def test_eight_concurrent_requests_to_different_bricks_get_their_single_answers(stack: Stack) -> None:
    assert len(BRICKS) == 8
    single = {name: stack.tokens(name) for name in BRICKS}
    assert len({tuple(t) for t in single.values()}) == len(BRICKS)  # eight different adapters

    def ask(name: str) -> tuple[str, Any]:
        return name, stack.tokens(name)

    with ThreadPoolExecutor(len(BRICKS)) as pool:
        concurrent = dict(pool.map(ask, reversed(BRICKS)))
    assert concurrent == single
    assert single["c3"] == greedy_reference(stack.base, stack.adapters["c3"])


def test_an_adapter_composition_is_served_by_id(stack: Stack, tmp_path: Path) -> None:
    bricks = [{"name": "alpha", "version": 1, "weight": 0.7}, {"name": "beta", "version": 1, "weight": -0.4}]
    body = {"base_model": BASE, "bricks": bricks, "output": "adapter"}
    response = stack.brickyard.post("/v1/compositions", json=body)
    assert response.status_code in (200, 202), response.text
    composition_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (status := stack.brickyard.get(f"/v1/compositions/{composition_id}").json()["status"]) not in (
        "ready",
        "failed",
    ):
        assert time.monotonic() < deadline, "composition not built in 120 s"
        time.sleep(0.2)
    assert status == "ready"
    # The reference runs PEFT on the composition's files as the REST API serves them.
    local = tmp_path / "composition"
    for file in stack.brickyard.get(f"/v1/compositions/{composition_id}/files").json():
        target = local / file["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(stack.brickyard.get(f"/v1/compositions/{composition_id}/files/{file['path']}").content)
    expected = greedy_reference(stack.base, local)
    assert stack.tokens(composition_id) == expected
    assert expected not in (stack.tokens("alpha"), stack.tokens("beta"))


def test_a_brick_loaded_by_hub_repo_id_through_hf_endpoint_matches_peft(stack: Stack) -> None:
    # No resolver involved: vLLM's own runtime loading fetches `bricks/<name>` with
    # huggingface_hub from Brickyard's Hugging Face-compatible endpoints (HF_ENDPOINT).
    loaded = httpx.post(
        f"{stack.vllm_url}/v1/load_lora_adapter",
        json={"lora_name": "hub-alpha", "lora_path": "bricks/alpha"},
        timeout=300,
    )
    assert loaded.status_code == 200, loaded.text
    assert stack.tokens("hub-alpha") == greedy_reference(stack.base, stack.adapters["alpha"])
    assert (stack.vllm_log.parent / "hf-home").is_dir()  # it went through the hub client's cache
