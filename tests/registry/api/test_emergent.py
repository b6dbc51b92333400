"""Emergent bricks over HTTP on both backends: a discovery job end to end on a tiny Llama (two
probe functions), bricks listed, searched and filtered by kind, the verification table stored
(and checked against an independent ablation), delete; compositions that ablate and restrict;
bad discovery requests refused with 422 before anything is queued."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import brick_metadata, register_base, upload, wait_ready

CODE = [f"def f{i}(x): return x * {i} + {i * 3}" for i in range(10)]
PROSE = [f"the quiet river {w} under the old stone bridge at dawn" for w in "abcdefghij"]


def _discovery(method: str = "average_precision", **extra: Any) -> dict[str, Any]:
    return {
        "probes": [
            {"name": "code-neurons", "description": "Neurons that fire on Python source code.", "texts": CODE},
            {"name": "prose-neurons", "description": "Neurons that fire on English prose.", "texts": PROSE},
        ],
        "method": method,
        "params": {"top_fraction": 0.1} if method == "average_precision" else {"top_rate": 0.1},
        "held_out": 0.3,
        **extra,
    }


@pytest.fixture
def discovered(client: Any, llama_base: Path) -> dict[str, Any]:
    register_base(client, llama_base)
    response = client.post("/v1/base-models/tiny-llama/emergent", json=_discovery())
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/compositions/{response.json()['id']}"
    job = wait_ready(client, response.json()["id"], timeout_s=300)
    assert job["status"] == "ready", job
    return job


def _held_out_loss(base: Path, texts: list[str], ablate: dict[int, list[int]]) -> float:
    """Mean next-token loss of ``texts`` with the given down_proj columns zeroed, computed here
    with plain transformers (one text at a time, no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for layer, index in ablate.items():
            model.model.layers[layer].mlp.down_proj.weight[:, index] = 0.0
        total, count = 0.0, 0
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count


def test_discovery_registers_one_emergent_brick_per_function(
    client: Any, discovered: dict[str, Any], llama_base: Path
) -> None:
    from composer import load_neuron_set
    from registry.emergent.discovery import split_held_out

    assert discovered["recipe"]["job"] == "emergent-discovery"
    assert discovered["recipe"]["functions"] == ["code-neurons", "prose-neurons"]
    listed = client.get("/v1/bricks", params={"kind": "emergent"}).json()["items"]
    assert [(b["name"], b["version"], b["kind"]) for b in listed] == [
        ("code-neurons", 1, "emergent"),
        ("prose-neurons", 1, "emergent"),
    ]
    assert client.get("/v1/bricks", params={"kind": "lora"}).json()["items"] == []
    assert client.get("/v1/bricks", params={"kind": "adapter"}).status_code == 422

    brick = client.get("/v1/bricks/code-neurons").json()
    info = brick["emergent"]
    assert info["method"] == "average_precision" and info["params"] == {"top_fraction": 0.1}
    assert set(info["probe_hashes"]) == {"code-neurons", "prose-neurons"}
    assert info["statistics"]["layers"] == 2 and info["statistics"]["width"] == 64
    # AP keeps top_fraction of all 2 x 64 neurons per function
    assert info["neurons"] == round(0.1 * 128) == sum(info["neurons_per_layer"].values())
    table = info["verification"]
    assert set(table["loss"]) == {"code-neurons", "prose-neurons", "random:code-neurons", "random:prose-neurons"}
    assert table["sizes"]["random:code-neurons"] == table["sizes"]["code-neurons"] == info["neurons"]

    files = client.get("/v1/bricks/code-neurons/versions/1/files").json()
    assert [f["filename"] for f in files] == ["neurons.safetensors"]
    raw = client.get("/v1/bricks/code-neurons/versions/1/files/neurons.safetensors")
    assert raw.status_code == 200
    path = Path(llama_base.parent / "downloaded-neurons.safetensors")
    path.write_bytes(raw.content)
    stored = load_neuron_set(path)
    assert stored.function == "code-neurons" and stored.method == "average_precision"
    assert {str(k): int(v.numel()) for k, v in stored.neurons.items()} == info["neurons_per_layer"]

    # The stored table, recomputed independently: the held-out texts' loss with the set zeroed.
    _, held = split_held_out(CODE, 0.3, 0)
    ablate = {layer: index.tolist() for layer, index in stored.neurons.items()}
    assert table["base_loss"]["code-neurons"] == pytest.approx(_held_out_loss(llama_base, held, {}), rel=1e-4)
    assert table["loss"]["code-neurons"]["code-neurons"] == pytest.approx(
        _held_out_loss(llama_base, held, ablate), rel=1e-4
    )


def test_emergent_bricks_are_searched_by_kind_and_deleted(
    client: Any, discovered: dict[str, Any], loras: dict[str, Path]
) -> None:
    assert (
        upload(
            client, loras["r4"], metadata=brick_metadata("python-lora", description="Writes Python code.")
        ).status_code
        == 201
    )
    query = {"query": "neurons for Python source code", "k": 5}
    kinds = {h["brick"]["name"]: h["brick"]["kind"] for h in client.post("/v1/search", json=query).json()["hits"]}
    assert kinds == {"code-neurons": "emergent", "prose-neurons": "emergent", "python-lora": "lora"}
    emergent = client.post("/v1/search", json={**query, "kind": "emergent"}).json()["hits"]
    assert {h["brick"]["name"] for h in emergent} == {"code-neurons", "prose-neurons"}
    assert emergent[0]["brick"]["name"] == "code-neurons"
    lora = client.post("/v1/search", json={**query, "kind": "lora"}).json()["hits"]
    assert [h["brick"]["name"] for h in lora] == ["python-lora"]

    assert client.delete("/v1/bricks/code-neurons/versions/1").status_code == 200
    assert [b["name"] for b in client.get("/v1/bricks", params={"kind": "emergent"}).json()["items"]] == [
        "prose-neurons"
    ]
    emergent = client.post("/v1/search", json={**query, "kind": "emergent"}).json()["hits"]
    assert [h["brick"]["name"] for h in emergent] == ["prose-neurons"]


def _tensors(client: Any, composition_id: str, target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    archive = client.get(f"/v1/compositions/{composition_id}/archive").content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(target, filter="data")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(target.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_compositions_ablate_and_restrict_with_emergent_bricks(
    client: Any, discovered: dict[str, Any], loras: dict[str, Path], tmp_path: Path
) -> None:
    from composer import load_neuron_set

    assert upload(client, loras["all"], metadata=brick_metadata("everything")).status_code == 201
    plain = {"base_model": "tiny-llama", "bricks": [{"name": "everything"}]}
    ablate = {**plain, "neurons": [{"brick": "code-neurons@1", "op": "ablate"}]}
    restrict = {
        **plain,
        "output": "adapter",
        "neurons": [{"brick": "code-neurons", "op": "restrict", "target": "everything"}],
    }
    ids = {}
    for label, request in (
        ("plain", plain),
        ("ablate", ablate),
        ("restrict", restrict),
        ("adapter", {**plain, "output": "adapter"}),
    ):
        response = client.post("/v1/compositions", json=request)
        assert response.status_code == 202, response.text
        ids[label] = response.json()["id"]
        assert wait_ready(client, ids[label])["status"] == "ready"
    assert len(set(ids.values())) == 4  # the neuron operations are part of the recipe (and the id)
    recipe = client.get(f"/v1/compositions/{ids['ablate']}").json()["recipe"]
    code = client.get("/v1/bricks/code-neurons").json()
    assert recipe["neurons"] == [
        {"name": "code-neurons", "version": 1, "sha256": code["sha256"], "op": "ablate", "factor": None, "target": None}
    ]
    assert "neurons" not in client.get(f"/v1/compositions/{ids['plain']}").json()["recipe"]

    path = tmp_path / "code.safetensors"
    path.write_bytes(client.get("/v1/bricks/code-neurons/versions/1/files/neurons.safetensors").content)
    neurons = load_neuron_set(path).neurons

    merged, ablated = (
        _tensors(client, ids["plain"], tmp_path / "plain"),
        _tensors(client, ids["ablate"], tmp_path / "ablate"),
    )
    for layer, index in neurons.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = merged[name].clone()
        expected[:, index] = 0.0
        assert torch.equal(ablated[name], expected)
    assert all(torch.equal(merged[k], ablated[k]) for k in merged if "down_proj" not in k)

    full_adapter = _tensors(client, ids["adapter"], tmp_path / "adapter")
    restricted = _tensors(client, ids["restrict"], tmp_path / "restrict")
    for key, a in full_adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = full_adapter[key.replace("lora_A", "lora_B")] @ a
        got = restricted[key.replace("lora_A", "lora_B")] @ restricted[key]
        layer, leaf = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        keep = torch.zeros(64, dtype=torch.bool)
        keep[neurons.get(layer, torch.zeros(0, dtype=torch.int64))] = True
        if leaf in ("gate_proj", "up_proj"):
            expected = delta * keep[:, None]
        elif leaf == "down_proj":
            expected = delta * keep[None, :]
        else:
            expected = torch.zeros_like(delta)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_neuron_operations_that_do_not_fit_are_refused(
    client: Any, discovered: dict[str, Any], loras: dict[str, Path]
) -> None:
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    base = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]}
    cases = [
        ({**base, "bricks": [{"name": "code-neurons"}]}, "emergent brick"),
        ({**base, "neurons": [{"brick": "sentiment", "op": "ablate"}]}, "not an emergent one"),
        ({**base, "output": "adapter", "neurons": [{"brick": "code-neurons", "op": "ablate"}]}, "needs output 'full'"),
        ({**base, "neurons": [{"brick": "code-neurons", "op": "restrict", "target": "nope"}]}, "not a brick of this"),
        ({**base, "neurons": [{"brick": "code-neurons", "op": "scale"}]}, "needs one"),
        ({**base, "neurons": [{"brick": "code-neurons", "op": "ablate", "factor": 2}]}, "factor goes with"),
    ]
    for request, expected in cases:
        response = client.post("/v1/compositions", json=request)
        assert response.status_code == 422, (request, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert expected in json.dumps(response.json()), response.json()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"probes": []}, "probes"),
        ({"probes": _discovery()["probes"][:1]}, "at least 2"),
        ({"probes": [{**_discovery()["probes"][0], "texts": []}, _discovery()["probes"][1]]}, "texts"),
        ({"probes": [{**_discovery()["probes"][0], "texts": ["x" * 8001, "y"]}, _discovery()["probes"][1]]}, "8000"),
        ({"probes": [_discovery()["probes"][0], _discovery()["probes"][0]]}, "distinct"),
        ({"method": "magic"}, "unknown selection method"),
        ({"params": {"top_fraction": 2.0}}, "top_fraction"),
        ({"params": {"nonsense": 1}}, "nonsense"),
        ({"held_out": 1.0}, "held_out"),
    ],
)
def test_bad_discovery_requests_are_refused(
    client: Any, llama_base: Path, change: dict[str, Any], expected: str
) -> None:
    register_base(client, llama_base)
    response = client.post("/v1/base-models/tiny-llama/emergent", json={**_discovery(), **change})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert expected in json.dumps(response.json()), response.json()
    assert client.get("/v1/bricks", params={"kind": "emergent"}).json()["items"] == []


def test_discovery_of_an_unknown_base_model_is_404(client: Any) -> None:
    assert client.post("/v1/base-models/nope/emergent", json=_discovery()).status_code == 404


def test_a_probe_named_like_a_lora_brick_is_refused(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"], metadata=brick_metadata("code-neurons")).status_code == 201
    response = client.post("/v1/base-models/tiny-llama/emergent", json=_discovery())
    assert response.status_code == 422
    assert "is a LoRA brick" in json.dumps(response.json())
