"""Tiny random base models and LoRA bricks, built locally from a config (no downloads).

Used by `brickyard demo`, the test fixtures and the benchmarks. torch, transformers and
peft are imported inside the functions: importing this module is cheap.

LoRAs are built with ``init_lora_weights=False`` so that B is random, not zero: with the
default zero-init every merge is trivially the base model and proves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["LLAMA_PROJECTIONS", "make_base_model", "make_lora", "make_tokenizer"]

Family = Literal["llama", "gpt2"]

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CORPUS = [
    "translate customer emails from romanian to english",
    "classify the sentiment of a product review as positive or negative",
    "summarize a news article in one sentence",
    "answer a question about a short paragraph",
    "write python code that sorts a list of numbers",
    "the quick brown fox jumps over the lazy dog",
    "bricks are lora adapters trained on a shared base model",
]


def make_tokenizer(out_dir: Path, vocab_size: int = 384) -> Path:
    """Train a tiny byte-level BPE tokenizer on a fixed corpus and save it in HF format.

    Args:
        out_dir: directory to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: target vocabulary size (at least 260: 256 bytes plus special tokens).

    Returns:
        ``out_dir``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _config(family: Family, *, num_layers: int, hidden: int, intermediate: int, vocab: int) -> Any:
    from transformers import GPT2Config, LlamaConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_inner=intermediate,
            n_layer=num_layers,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(f"unknown model family {family!r}")


def make_base_model(
    out_dir: Path,
    *,
    family: Family = "llama",
    num_layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    vocab: int = 384,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Build a random causal LM from a config and save it as safetensors (sharded if asked).

    Args:
        out_dir: target directory (created).
        family: ``"llama"`` (nn.Linear projections) or ``"gpt2"`` (Conv1D, fan-in-fan-out).
        num_layers, hidden, intermediate, vocab: model size.
        dtype: torch dtype name of the saved weights (``float32``, ``bfloat16``, ``float16``).
        max_shard_size: passed to ``save_pretrained``; a small value forces sharding.
        seed: torch seed for the random weights.
        tokenizer: also save a tiny trained tokenizer, so the model can generate text.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family, num_layers=num_layers, hidden=hidden, intermediate=intermediate, vocab=vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Spread the weights out: a near-zero init makes deltas dominate and hides merge errors.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    if tokenizer:
        make_tokenizer(out_dir, vocab_size=vocab)
    return out_dir


def make_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    seed: int = 1,
    scale: float = 0.3,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Build a random LoRA adapter for ``base_dir`` and save it in PEFT format.

    Both A and B are random (``init_lora_weights=False``), rescaled to ``scale`` standard
    deviation so that deltas are of the same order as the toy base weights.

    Args:
        base_dir: a directory written by `make_base_model`.
        out_dir: target directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        r, alpha, target_modules, use_rslora, rank_pattern, alpha_pattern: the LoraConfig.
        seed: torch seed for the random factors.
        scale: standard deviation of the factor entries.
        base_model_name_or_path: value recorded in the config (defaults to ``base_dir``).

    Returns:
        ``out_dir``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fan_in_fan_out = model.config.model_type == "gpt2"
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        init_lora_weights=False,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    if base_model_name_or_path is not None:
        config_path = out_dir / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = base_model_name_or_path
        config_path.write_text(json.dumps(data, indent=2))
    return out_dir
