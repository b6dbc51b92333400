"""Adapters of every kind PEFT writes, registered and composed over HTTP: two bricks linear
0.7 / 0.3 in full and adapter output give the logits of PEFT's own merge of each brick,
summed as deltas (`tests.composer.zoo.peft_reference`); the adapter output names the
registered base, so `AutoPeftModelForCausalLM.from_pretrained(dir)` loads it as it is."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.composer.helpers import quiet
from tests.composer.zoo import ARCHS, MOE_ARCHS, load_adapter_model, load_model, make_adapter, make_base, peft_reference
from tests.conftest import brick_metadata, register_base, upload, wait_ready

WEIGHTS = (0.7, 0.3)

# (architecture, kind): LoraConfig arguments of the two bricks.
CASES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {
    ("llama", "dora"): (
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": "all-linear"},
        {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]},
    ),
    ("llama", "modules_to_save"): (
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["down_proj", "lm_head"]},
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]},
    ),
    ("llama", "embedding"): (
        {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
        {"r": 2, "lora_alpha": 6, "target_modules": ["embed_tokens"]},
    ),
    # GPT-2 checkpoints are stored without "transformer." (as on the Hub); Conv1D layers.
    # PEFT 0.21's all-linear on transformers 5's fused experts: target_parameters (gate_up_proj,
    # down_proj, the router) besides attention modules.
    ("qwen3_moe", "target_parameters"): (
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        {"r": 2, "lora_alpha": 6, "target_modules": ["v_proj"], "target_parameters": ["experts.down_proj"]},
    ),
    ("gpt2", "unprefixed"): (
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
        {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    ),
}


@pytest.fixture(scope="module")
def peft_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, list[Path]]]:
    """Bases (one per architecture) and two adapters per case, built once for the module."""
    root = tmp_path_factory.mktemp("peft-http")
    bases: dict[str, Path] = {}
    built = {}
    for (arch, kind), configs in CASES.items():
        if arch not in bases:
            bases[arch] = make_base(ARCHS.get(arch) or MOE_ARCHS[arch], root / arch)
        adapters = [
            # task_type tells AutoPeftModelForCausalLM which model class to load
            make_adapter(bases[arch], root / f"{arch}-{kind}-{i}", seed=200 + i, task_type="CAUSAL_LM", **config)
            for i, config in enumerate(configs)
        ]
        built[(arch, kind)] = (bases[arch], adapters)
    return built


def _ids() -> torch.Tensor:
    return (torch.arange(0, 32).reshape(2, 16) * 7) % 128


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _download(client: Any, composition_id: str, target: Path) -> Path:
    archive = client.get(f"/v1/compositions/{composition_id}/archive")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:") as tar:
        tar.extractall(target, filter="data")
    return target


def _compose(client: Any, base_name: str, bricks: list[str], **extra: Any) -> str:
    request = {
        "base_model": base_name,
        "bricks": [{"name": n, "weight": w} for n, w in zip(bricks, WEIGHTS, strict=True)],
        **extra,
    }
    response = client.post("/v1/compositions", json=request)
    assert response.status_code in (200, 202), response.text
    done = wait_ready(client, response.json()["id"], timeout_s=300)
    assert done["status"] == "ready", done
    return str(done["id"])


@pytest.mark.parametrize(("arch", "kind"), list(CASES))
def test_bricks_of_each_kind_register_and_compose_over_http_like_peft(
    client: Any, peft_zoo: dict[tuple[str, str], tuple[Path, list[Path]]], arch: str, kind: str, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    base, adapters = peft_zoo[(arch, kind)]
    base_name = f"tiny-{arch}"
    register_base(client, base, name=base_name)
    names = [f"{kind}-{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters, strict=True):
        response = upload(client, adapter, metadata=brick_metadata(name, base_model=base_name))
        assert response.status_code == 201, response.text
        assert response.json()["module_count"] > 0, response.json()
    expected = _logits(peft_reference(base, adapters, WEIGHTS))
    assert not torch.allclose(expected, _logits(load_model(base)), atol=1e-3)  # the bricks change the model

    full = _download(client, _compose(client, base_name, names), tmp_path / "full")
    torch.testing.assert_close(_logits(load_model(full)), expected, atol=2e-4, rtol=1e-4)

    # DoRA deltas are full-rank: at a rank no smaller than any module's the SVD is exact.
    rank = 128 if kind == "dora" else None
    adapter_id = _compose(client, base_name, names, output="adapter", **({"rank": rank} if rank else {}))
    adapter = _download(client, adapter_id, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert f"base_model: {json.dumps(base_name)}" in (adapter / "README.md").read_text()
    with quiet():
        loaded = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    if kind == "embedding":
        # Compare the merged adapter: PEFT's unmerged embedding LoRA and its merge agree here
        # (the head is untied), and merging is what the bricks define.
        with quiet():
            loaded = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(loaded), expected, atol=5e-4 if rank else 2e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(load_adapter_model(base, adapter)), _logits(loaded), atol=1e-4, rtol=1e-4)
    if kind == "target_parameters":
        # A truncated adapter cannot keep ParamWrapper factors exact: refused, one line per brick.
        request = {"base_model": base_name, "bricks": [{"name": n} for n in names], "output": "adapter", "rank": 4}
        refused = client.post("/v1/compositions", json=request)
        assert refused.status_code == 422, refused.text
        lines = [e for e in refused.json()["errors"] if "adapts raw parameters (target_parameters" in e]
        assert len(lines) == 2 and all("compose output='full'" in e for e in lines), refused.json()


def test_legacy_per_expert_mixtral_adapters_register_and_compose_over_http(client: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.composer.test_peft_moe import _legacy_adapter, _mixtral

    base = _mixtral(tmp_path / "mixtral")
    register_base(client, base, name="tiny-mixtral")
    deltas = []
    for i, (r, alpha) in enumerate(((4, 8), (2, 2))):
        deltas.append(_legacy_adapter(base, tmp_path / f"moe-{i}", seed=10 + i, r=r, alpha=alpha))
        response = upload(client, tmp_path / f"moe-{i}", metadata=brick_metadata(f"moe-{i}", base_model="tiny-mixtral"))
        assert response.status_code == 201, response.text
        # every expert's w1/w2/w3, the router and q_proj, in 2 layers: stored keys, not the fused model's
        assert response.json()["module_count"] == 2 * (4 * 3 + 2)
    out = _download(client, _compose(client, "tiny-mixtral", ["moe-0", "moe-1"]), tmp_path / "full")
    stored, merged = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert merged.keys() == stored.keys()
    for name, weight in stored.items():
        expected = weight.double() + WEIGHTS[0] * deltas[0].get(name, 0.0) + WEIGHTS[1] * deltas[1].get(name, 0.0)
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)
