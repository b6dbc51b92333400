"""Compositions over HTTP on both backends: by names, by instruction, the cache, identical
concurrent requests, Range, the tar archive (loaded with transformers and PEFT), foreign
bricks refused, and a build killed with its server recovered. Tests marked
``on_every_storage`` also run with bricks and outputs on S3-compatible object storage."""

from __future__ import annotations

import io
import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import brick_metadata, on_every_storage, register_base, upload, wait_ready


@pytest.fixture
def composable(client: Any, llama_base: Path, loras: dict[str, Path]) -> Any:
    register_base(client, llama_base)
    bricks = {
        "sentiment": ("Classify the sentiment of a product review.", loras["r4"]),
        "translate": ("Translate customer emails from Romanian to English.", loras["r8"]),
        "summarize": ("Summarize a news article in one sentence.", loras["pattern"]),
    }
    for name, (description, path) in bricks.items():
        assert upload(client, path, metadata=brick_metadata(name, description=description)).status_code == 201
    return client


def _extract(archive: bytes, target: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(target, filter="data")
    return target


def _logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[3, 17, 42, 5, 99]])).logits


@on_every_storage
def test_compose_by_names_builds_and_serves_a_loadable_model(
    composable: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    request = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment", "weight": 0.7}, {"name": "translate"}]}
    response = composable.post("/v1/compositions", json=request)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] in ("queued", "running", "ready")
    assert response.headers["location"] == f"/v1/compositions/{body['id']}"
    recipe = body["recipe"]
    assert [(b["name"], b["version"], b["weight"]) for b in recipe["bricks"]] == [
        ("sentiment", 1, 0.7),
        ("translate", 1, 1.0),
    ]
    assert recipe["method"] == "linear" and recipe["output"] == "full"
    assert len(recipe["base_model"]["fingerprint"]) == 64
    done = wait_ready(composable, body["id"])
    assert done["status"] == "ready", done
    assert done["progress"] == 1.0 and done["size_bytes"] > 0

    files = {f["path"]: f["size_bytes"] for f in composable.get(f"/v1/compositions/{body['id']}/files").json()}
    assert {"config.json", "model.safetensors.index.json", "brickyard.json", "README.md", "tokenizer.json"} <= set(
        files
    )
    record = json.loads(composable.get(f"/v1/compositions/{body['id']}/files/brickyard.json").content)
    assert record["recipe"]["id"] == body["id"]

    out = _extract(composable.get(f"/v1/compositions/{body['id']}/archive").content, tmp_path / "merged")
    assert {p.name for p in out.iterdir()} == set(files)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # The same merge done by PEFT in memory: weights 0.7 and 1.0 on the two adapters.
    base = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, loras["r4"], adapter_name="a")
    reference.load_adapter(loras["r8"], adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.7, 1.0], "mix", combination_type="cat")
    reference.set_adapter("mix")
    assert torch.allclose(_logits(merged), _logits(reference), atol=1e-4)


@on_every_storage
def test_adapter_output_loads_with_peft(composable: Any, llama_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    request = {
        "base_model": "tiny-llama",
        "bricks": [{"name": "sentiment"}, {"name": "summarize", "weight": -0.5}],
        "output": "adapter",
    }
    body = composable.post("/v1/compositions", json=request).json()
    assert wait_ready(composable, body["id"])["status"] == "ready"
    out = _extract(composable.get(f"/v1/compositions/{body['id']}/archive").content, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    plain = _logits(base)
    model = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(_logits(model), plain, atol=1e-3)


def test_compose_by_instruction_drops_a_brick_that_does_not_fit(composable: Any) -> None:
    request = {"base_model": "tiny-llama", "instruction": "translate my Romanian emails into English", "k": 2}
    body = composable.post("/v1/compositions", json=request).json()
    # The second hit (a review or news brick) trails the translation brick by far more than
    # the floor allows: it is dropped instead of diluting the merge.
    assert [(b["name"], b["weight"]) for b in body["recipe"]["bricks"]] == [("translate", 1.0)]
    assert wait_ready(composable, body["id"])["status"] == "ready"
    explicit = composable.post("/v1/compositions", json={**request, "weights": [1.0, 0.0]}).json()
    assert [b["weight"] for b in explicit["recipe"]["bricks"]] == [1.0, 0.0]
    wrong = composable.post("/v1/compositions", json={**request, "weights": [1.0]})
    assert wrong.status_code == 422 and "give 2 weights" in wrong.text


def test_compose_by_instruction_gives_two_fitting_bricks_both_a_real_share(
    composable: Any, loras: dict[str, Path]
) -> None:
    meta = brick_metadata("tweet-sentiment", description="Classify the sentiment of a tweet.")
    assert upload(composable, loras["rslora"], metadata=meta).status_code == 201
    request = {"base_model": "tiny-llama", "instruction": "classify the sentiment of reviews and tweets", "k": 2}
    bricks = composable.post("/v1/compositions", json=request).json()["recipe"]["bricks"]
    assert {b["name"] for b in bricks} == {"sentiment", "tweet-sentiment"}
    assert sum(b["weight"] for b in bricks) == pytest.approx(1.0)
    assert min(b["weight"] for b in bricks) > 0.2


@on_every_storage
def test_cache_hit_answers_200_with_the_same_id(composable: Any) -> None:
    request = {
        "base_model": "tiny-llama",
        "bricks": [{"name": "sentiment"}],
        "method": "ties",
        "params": {"density": 0.3},
    }
    first = composable.post("/v1/compositions", json=request).json()
    assert wait_ready(composable, first["id"])["status"] == "ready"
    again = composable.post(
        "/v1/compositions", json={**request, "bricks": [{"name": "sentiment", "version": 1, "weight": 1.0}]}
    )
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["status"] == "ready"
    assert again.json()["attempts"] == 1
    other = composable.post("/v1/compositions", json={**request, "params": {"density": 0.4}})
    assert other.status_code == 202 and other.json()["id"] != first["id"]


def test_identical_concurrent_requests_build_once(composable: Any) -> None:
    request = {
        "base_model": "tiny-llama",
        "bricks": [{"name": "translate"}, {"name": "summarize"}],
        "method": "dare_ties",
    }

    def post(_: int) -> Any:
        return composable.post("/v1/compositions", json=request)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    done = wait_ready(composable, ids.pop())
    assert done["status"] == "ready"
    assert done["attempts"] == 1  # claimed and built exactly once


@on_every_storage
def test_range_requests_on_composed_files(composable: Any) -> None:
    body = composable.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]}
    ).json()
    wait_ready(composable, body["id"])
    files = composable.get(f"/v1/compositions/{body['id']}/files").json()
    shard = next(f["path"] for f in files if f["path"].endswith(".safetensors"))
    whole = composable.get(f"/v1/compositions/{body['id']}/files/{shard}").content
    part = composable.get(f"/v1/compositions/{body['id']}/files/{shard}", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206
    assert part.content == whole[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(whole)}"
    tail = composable.get(f"/v1/compositions/{body['id']}/files/{shard}", headers={"Range": "bytes=-64"})
    assert tail.content == whole[-64:]
    outside = composable.get(
        f"/v1/compositions/{body['id']}/files/{shard}", headers={"Range": f"bytes={len(whole) + 10}-"}
    )
    assert outside.status_code == 416
    cases = {"..%2F..%2Fbrickyard.db": 404, "config.json%2F..%2F..%2F..": 404, "nope.bin": 404, "%2Fetc%2Fpasswd": 422}
    for bad, status in cases.items():
        response = composable.get(f"/v1/compositions/{body['id']}/files/{bad}")
        assert response.status_code == status, bad
        assert response.headers["content-type"] == "application/problem+json"


def test_bricks_of_another_base_model_are_refused_and_listed(composable: Any, gpt2_base: Path, gpt2_lora: Path) -> None:
    register_base(composable, gpt2_base, name="tiny-gpt2")
    upload(composable, gpt2_lora, metadata=brick_metadata("gpt-brick", base_model="tiny-gpt2"))
    response = composable.post(
        "/v1/compositions",
        json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}, {"name": "gpt-brick"}]},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["type"].endswith("/incompatible-brick")
    assert body["errors"] == ["gpt-brick@1 is a brick of base model 'tiny-gpt2', whose fingerprint differs"]
    assert body["bricks"] == [{"name": "gpt-brick", "version": 1, "base_model": "tiny-gpt2"}]


@pytest.mark.parametrize(
    "request_body",
    [
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "no-such-method"},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "ties", "params": {"density": 0}},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "ties", "params": {"density": 1.5}},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "params": {"unknown": 1}},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment", "weight": 1e9}]},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}] * 1000},
        {"base_model": "tiny-llama", "bricks": []},
        {"base_model": "tiny-llama"},
        {"base_model": "tiny-llama", "instruction": "x", "bricks": [{"name": "sentiment"}]},
        {"base_model": "tiny-llama", "instruction": "x", "k": 0},
        {"base_model": "tiny-llama", "instruction": "x", "k": 1_000_000},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "gguf"},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "rank": 4},
        {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter", "method": "ties"},
    ],
)
def test_bad_composition_requests_are_422(composable: Any, request_body: dict[str, Any]) -> None:
    response = composable.post("/v1/compositions", json=request_body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"]


def test_nan_weight_and_unknown_names(composable: Any) -> None:
    nan = composable.post(
        "/v1/compositions",
        content=b'{"base_model": "tiny-llama", "bricks": [{"name": "sentiment", "weight": NaN}]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422
    assert (
        composable.post("/v1/compositions", json={"base_model": "nope", "bricks": [{"name": "x"}]}).status_code == 404
    )
    missing = composable.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "x"}]})
    assert missing.status_code == 404
    unknown = composable.get("/v1/compositions/" + "0" * 64)
    assert unknown.status_code == 404
    unnamed = composable.get("/v1/compositions/not-a-name")  # a name would be accepted; none points anywhere
    assert unnamed.status_code == 404 and unnamed.json()["type"].endswith("composition-not-found")
    assert composable.get("/v1/compositions/-not-an-id").status_code == 422


def test_merge_methods_are_listed_with_parameters(client: Any) -> None:
    methods = {m["name"]: m for m in client.get("/v1/merge-methods").json()}
    assert set(methods) == {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    ties = methods["ties"]["params"]["properties"]
    assert ties["density"]["default"] == 0.5
    assert set(ties["majority_sign_method"]["enum"]) == {"total", "frequency"}
    assert "seed" in methods["dare_ties"]["params"]["properties"]
    assert all(m["description"] for m in methods.values())


def test_files_of_an_unfinished_composition_are_409(composable: Any, registry: Any) -> None:
    from registry.builds.compositions import recipe_id

    recipe, base_id = registry.compositions.resolve({"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]})
    composition_id = recipe_id(recipe)
    # queue it without a worker to claim it: stop the app's workers first
    composable.app.state.workers.stop()
    registry.compositions.store.create(
        composition_id, recipe, base_model_id=base_id, output="full", method="linear", actor=None
    )
    for path in ("files", "archive", "files/config.json"):
        response = composable.get(f"/v1/compositions/{composition_id}/{path}")
        assert response.status_code == 409, path
        assert response.json()["composition_status"] == "queued"


def test_killed_build_is_detected_and_retried(live_server: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    with live_server.http() as http:
        assert http.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
        assert upload(http, loras["r4"]).status_code == 201
        request = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "ties"}
        composition = http.post("/v1/compositions", json=request).json()
        deadline = time.monotonic() + 30
        while http.get(f"/v1/compositions/{composition['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The build's child process is running (it starts by importing torch); kill the server.
    live_server.kill()
    live_server.start()
    with live_server.http() as http:
        state = http.get(f"/v1/compositions/{composition['id']}").json()
        if state["status"] != "ready":  # the child could not have finished: it died with the server
            assert state["status"] == "failed", state
            assert state["error_code"] in ("interrupted", "build-crashed")
            assert http.get(f"/v1/compositions/{composition['id']}/files").status_code == 409
            retry = http.post("/v1/compositions", json=request)
            assert retry.status_code == 202
            assert retry.json()["id"] == composition["id"]
        done = wait_ready(http, composition["id"])
        assert done["status"] == "ready", done
        assert done["attempts"] == (1 if state["status"] == "ready" else 2)
        assert http.get(f"/v1/compositions/{composition['id']}/files").status_code == 200


def test_a_build_process_that_dies_fails_its_build_and_is_replaced(
    live_server: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    import psutil

    with live_server.http() as http:
        assert http.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
        assert upload(http, loras["r4"]).status_code == 201
        request = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "magnitude_prune"}
        composition = http.post("/v1/compositions", json=request).json()
        server = psutil.Process(live_server.process.pid)
        deadline = time.monotonic() + 30
        builders: list[Any] = []
        while not builders:
            assert time.monotonic() < deadline
            builders = [p for p in server.children() if "registry.builds.jobs" in " ".join(p.cmdline())]
            time.sleep(0.02)
        builders[0].kill()
        failed = wait_ready(http, composition["id"])
        if failed["status"] == "failed":  # killed before it finished (almost always: it starts by importing torch)
            assert failed["error_code"] == "build-crashed"
            assert "killed by signal 9" in failed["error"]
            assert http.post("/v1/compositions", json=request).status_code == 202
        done = wait_ready(http, composition["id"])
        assert done["status"] == "ready", done
