"""Registering and reading base models over HTTP, on both backends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open

from tests.conftest import register_base


def _expected_parameter_count(model_dir: Path) -> int:
    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "np") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def test_register_sharded_base_model_reads_headers(client: Any, llama_base: Path) -> None:
    assert (llama_base / "model.safetensors.index.json").exists()
    body = register_base(client, llama_base, description="tiny llama")
    assert body["architecture"] == "LlamaForCausalLM"
    assert body["dtype"] == "F32"
    assert body["parameter_count"] == _expected_parameter_count(llama_base)
    assert body["size_bytes"] == sum(p.stat().st_size for p in llama_base.glob("*.safetensors"))
    assert len(body["fingerprint"]) == 64
    modules = body["linear_modules"]
    # 2 layers x 7 projections + the untied lm_head
    assert len(modules) == 15
    assert modules["model.layers.0.self_attn.k_proj"] == {
        "out_features": 16,
        "in_features": 32,
        "fan_in_fan_out": False,
    }
    assert modules["model.layers.1.mlp.down_proj"] == {"out_features": 32, "in_features": 64, "fan_in_fan_out": False}
    assert client.get("/v1/base-models/tiny-llama").json() == body
    listed = client.get("/v1/base-models").json()
    assert [b["name"] for b in listed] == ["tiny-llama"]
    assert listed[0]["linear_module_count"] == 15


def test_gpt2_conv1d_modules_and_tied_head(client: Any, gpt2_base: Path) -> None:
    body = register_base(client, gpt2_base, name="tiny-gpt2")
    modules = body["linear_modules"]
    assert modules["transformer.h.0.attn.c_attn"] == {"out_features": 96, "in_features": 32, "fan_in_fan_out": True}
    assert "lm_head" not in modules  # tied to the embeddings, not stored


def test_fingerprint_ignores_sharding_but_not_shapes(client: Any, llama_base: Path, tmp_path: Path) -> None:
    from composer.testing import make_base_model

    resharded = make_base_model(tmp_path / "same-arch-one-file", seed=9, tokenizer=False)
    wider = make_base_model(tmp_path / "wider", hidden=48, tokenizer=False)
    a = register_base(client, llama_base)["fingerprint"]
    b = register_base(client, resharded, name="one-file")["fingerprint"]
    c = register_base(client, wider, name="wider")["fingerprint"]
    assert a == b
    assert a != c


def test_duplicate_name_is_409(client: Any, llama_base: Path) -> None:
    register_base(client, llama_base)
    again = client.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)})
    assert again.status_code == 409
    assert again.json()["type"].endswith("/base-model-exists")


def test_unknown_base_model_is_404_problem(client: Any) -> None:
    response = client.get("/v1/base-models/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/base-model-not-found")


def test_unreadable_directories_are_422_listing_problems(client: Any, llama_base: Path, tmp_path: Path) -> None:
    missing = client.post("/v1/base-models", json={"name": "x", "path": str(tmp_path / "absent")})
    assert missing.status_code == 422
    assert missing.json()["type"].endswith("/invalid-base-model")

    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    shutil.copy(llama_base / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    response = client.post("/v1/base-models", json={"name": "x", "path": str(pickle_only)})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any("convert .bin files" in e for e in errors)
    assert not any("pytorch_model.bin" in e for e in errors)  # names in the directory are not listed

    broken = tmp_path / "broken-index"
    shutil.copytree(llama_base, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    (broken / first_shard).unlink()
    (broken / "config.json").write_text("{not json")
    response = client.post("/v1/base-models", json={"name": "x", "path": str(broken)})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any("config.json is not valid JSON" in e for e in errors)
    assert client.get("/v1/base-models").json() == []


def test_bad_base_model_requests_are_422(client: Any, llama_base: Path) -> None:
    for body in ({"name": "../evil", "path": str(llama_base)}, {"name": "ok"}, {"name": "ok", "path": ""}, []):
        response = client.post("/v1/base-models", json=body)
        assert response.status_code == 422, body
        assert response.json()["errors"]
