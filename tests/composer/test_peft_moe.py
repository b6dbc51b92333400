"""Mixture-of-experts bases: adapters trained when Mixtral's experts and router were
``nn.Linear`` modules (``block_sparse_moe.experts.N.w1/w2/w3``, ``block_sparse_moe.gate``)
merge into the checkpoint's own 2-D tensors of those names, although transformers 5 builds
fused 3-D expert tensors from them; and the merged checkpoint loads like the base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from composer import compose
from tests.composer.helpers import PREFIX, quiet, source


def _mixtral(path: Path) -> Path:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with quiet():
        transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


def _legacy_adapter(base: Path, out: Path, seed: int, r: int, alpha: float) -> dict[str, torch.Tensor]:
    """A LoRA on every expert's w1/w2/w3, the router and q_proj, as PEFT saved them for
    the nn.Linear Mixtral; returns the expected delta per checkpoint tensor."""
    stored = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, weight in stored.items():
        if not any(part in name for part in (".w1.", ".w2.", ".w3.", "block_sparse_moe.gate.", "q_proj.")):
            continue
        module = name.removesuffix(".weight")
        a = torch.randn(r, weight.shape[1], generator=generator) * 0.1
        b = torch.randn(weight.shape[0], r, generator=generator) * 0.1
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        deltas[name] = (alpha / r) * b.double() @ a.double()
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["w1", "w2", "w3", "gate", "q_proj"],
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return deltas


def test_legacy_expert_adapters_land_on_the_checkpoints_own_tensors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = _mixtral(tmp_path / "mixtral")
    stored = load_file(str(base / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in stored  # the checkpoint's names
    first = _legacy_adapter(base, tmp_path / "a", seed=1, r=4, alpha=8)
    second = _legacy_adapter(base, tmp_path / "b", seed=2, r=2, alpha=2)
    out = compose(base, [source(tmp_path / "a", 0.7), source(tmp_path / "b", 0.3)], tmp_path / "out")
    merged = load_file(str(out.out_dir / "model.safetensors"))
    assert merged.keys() == stored.keys()
    for name, weight in stored.items():
        expected = weight.double() + 0.7 * first.get(name, 0.0) + 0.3 * second.get(name, 0.0)
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)
    assert len(first) == 2 * (4 * 3 + 2)  # every expert's w1/w2/w3, the router and q_proj, 2 layers

    # transformers still reads the merged checkpoint into its fused experts.
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(out.out_dir, dtype=torch.float32)
    fused = model.model.layers[1].mlp.experts.down_proj[2]
    torch.testing.assert_close(fused, merged["model.layers.1.block_sparse_moe.experts.2.w2.weight"])
