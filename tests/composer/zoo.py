"""Tiny base models of several architectures and PEFT adapters of every kind, built with
transformers and PEFT directly (hidden 64, 2 layers, vocabulary 128), and PEFT's own merge
as the reference.

Adapters have random A *and* B (``init_lora_weights=False``); DoRA magnitudes and saved
module copies are perturbed, so no brick is trivially the base or plain LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.composer.helpers import quiet

VOCAB = 128


@dataclass(frozen=True)
class Arch:
    """An architecture: how to build it, its embedding module, its untied head (if any),
    and whether its checkpoint is saved without ``base_model_prefix`` (as GPT-2, OPT and
    BLOOM checkpoints on the Hub are)."""

    name: str
    config: str
    kwargs: Mapping[str, Any]
    embedding: str
    head: str | None
    attention: str = "q_proj"
    mlp: str = "down_proj"
    unprefixed: bool = False
    model_class: str = "AutoModelForCausalLM"


_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            "llama",
            "LlamaConfig",
            _COMMON | {"intermediate_size": 96, "num_key_value_heads": 2, "tie_word_embeddings": False},
            "embed_tokens",
            "lm_head",
        ),
        Arch(
            "qwen2",
            "Qwen2Config",
            _COMMON | {"intermediate_size": 96, "num_key_value_heads": 2, "tie_word_embeddings": False},
            "embed_tokens",
            "lm_head",
        ),
        Arch(
            "gemma3",
            "Gemma3TextConfig",
            _COMMON | {"intermediate_size": 96, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16},
            "embed_tokens",
            None,
        ),
        Arch(
            "phi3",
            "Phi3Config",
            _COMMON
            | {
                "intermediate_size": 96,
                "num_key_value_heads": 4,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            "embed_tokens",
            "lm_head",
            attention="qkv_proj",
        ),
        Arch(
            "gpt2",
            "GPT2Config",
            {
                "vocab_size": VOCAB,
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 64,
                "bos_token_id": 0,
                "eos_token_id": 0,
            },
            "wte",
            None,
            attention="c_attn",
            mlp="c_fc",
            unprefixed=True,
        ),
        Arch(
            "gpt_neox",
            "GPTNeoXConfig",
            _COMMON | {"intermediate_size": 96},
            "embed_in",
            "embed_out",
            attention="query_key_value",
            mlp="dense_4h_to_h",
        ),
        Arch(
            "opt",
            "OPTConfig",
            _COMMON | {"ffn_dim": 96, "word_embed_proj_dim": 64, "max_position_embeddings": 64},
            "embed_tokens",
            None,
            mlp="fc2",
            unprefixed=True,
        ),
        Arch(
            "bloom",
            "BloomConfig",
            {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4},
            "word_embeddings",
            None,
            attention="query_key_value",
            mlp="dense_4h_to_h",
            unprefixed=True,
        ),
    )
}


# Mixture-of-experts architectures whose experts transformers 5 fuses into 3-D parameters
# (PEFT adapts them through target_parameters); not in ARCHS, whose kinds assume linear MLPs.
MOE_ARCHS: dict[str, Arch] = {
    "qwen3_moe": Arch(
        "qwen3_moe",
        "Qwen3MoeConfig",
        _COMMON
        | {
            "intermediate_size": 96,
            "moe_intermediate_size": 48,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
        },
        "embed_tokens",
        "lm_head",
    ),
}


def make_base(arch: Arch, path: Path, seed: int = 0) -> Path:
    """Save a float32 base model of ``arch`` at ``path`` (weights only from the config and
    a seed; un-prefixed archs get their keys without ``base_model_prefix``)."""
    import transformers

    config = getattr(transformers, arch.config)(**arch.kwargs)
    torch.manual_seed(seed)
    with quiet():
        model = getattr(transformers, arch.model_class).from_config(config)
        model.save_pretrained(path)
    if arch.unprefixed:
        prefix = model.base_model_prefix + "."
        file = path / "model.safetensors"
        tensors = load_file(str(file))
        save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, str(file), {"format": "pt"})
    return path


def load_model(path: Path) -> Any:
    """A float32 causal LM from ``path``."""
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, seed: int, **lora: Any) -> Path:
    """Save a PEFT LoRA adapter for ``base`` with random factors (``lora``: LoraConfig
    arguments). DoRA magnitudes and modules_to_save copies are perturbed before saving."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with quiet():
        model = get_peft_model(load_model(base), LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.rand_like(param))
                elif "modules_to_save" in name:
                    param.add_(0.05 * torch.randn_like(param))
        model.save_pretrained(out)
    return out


def peft_reference(base: Path, adapters: Sequence[Path], weights: Sequence[float]) -> Any:
    """The base model with ``W + sum_i w_i * (W_i - W)``, where ``W_i`` is what PEFT's
    ``merge_and_unload`` gives for adapter i alone (``get_delta_weight`` for LoRA, the DoRA
    rescaled weight for DoRA, the saved copy for modules_to_save)."""
    from peft import PeftModel

    model = load_model(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in original.items()}
    for adapter, weight in zip(adapters, weights, strict=True):
        with quiet():
            merged = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
        for key, value in merged.state_dict().items():
            total[key] += weight * (value.double() - original[key].double())
    with torch.no_grad():
        for key, param in model.state_dict().items():
            param.copy_((original[key].double() + total[key]).to(param.dtype))
    return model


def load_adapter_model(base: Path, adapter: Path) -> Any:
    """``base`` with the adapter at ``adapter`` attached by PEFT (unmerged)."""
    from peft import PeftModel

    with quiet():
        return PeftModel.from_pretrained(load_model(base), adapter).eval()
