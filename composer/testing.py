"""Tiny random base models and LoRA bricks, built locally from a config (no downloads).

Used by `brickyard demo`, the test fixtures and the benchmarks. torch, transformers and
peft are imported inside the functions: importing this module is cheap.

LoRAs are built with ``init_lora_weights=False`` so that B is random, not zero: with the
default zero-init every merge is trivially the base model and proves nothing.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "LLAMA_PROJECTIONS",
    "make_base_model",
    "make_lora",
    "make_synthetic_llama",
    "make_synthetic_lora",
    "make_tokenizer",
]

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
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft accepts floats; its hint says int
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        init_lora_weights=False,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # PEFT 0.21 reads a transformers attribute deprecated in v5; harmless, but it would
        # fail every caller that runs with warnings as errors.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    if base_model_name_or_path is not None:
        config_path = out_dir / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = base_model_name_or_path
        config_path.write_text(json.dumps(data, indent=2))
    return out_dir


def make_synthetic_llama(
    out_dir: Path,
    *,
    num_layers: int = 24,
    hidden: int = 1024,
    intermediate: int = 4096,
    vocab: int = 32000,
    num_heads: int = 16,
    num_kv_heads: int = 16,
    dtype: str = "bfloat16",
    shard_bytes: int = 200 * 1000 * 1000,
    seed: int = 0,
) -> Path:
    """Write a Llama-shaped model of random weights straight with safetensors (no
    transformers model is built, so a 0.5B model takes seconds), sharded like
    ``save_pretrained``: ``model-0000i-of-0000n.safetensors`` plus the index.

    Weights are N(0, 0.02); the model loads with ``AutoModelForCausalLM`` but is not meant to
    produce sensible text. No tokenizer is written.

    Args:
        out_dir: target directory (created).
        num_layers, hidden, intermediate, vocab, num_heads, num_kv_heads: the shape.
        dtype: torch dtype name of the weights.
        shard_bytes: a new shard starts when the next tensor would exceed this size.
        seed: torch seed.

    Returns:
        ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    torch_dtype = getattr(torch, dtype)
    head_dim = hidden // num_heads
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        dtype=dtype,
    )
    config.architectures = ["LlamaForCausalLM"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.self_attn.q_proj.weight", (num_heads * head_dim, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (num_kv_heads * head_dim, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (num_kv_heads * head_dim, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, num_heads * head_dim)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            (f"{prefix}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch_dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
            weight_map[name] = file
            total += tensors[name].numel() * itemsize
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    config.to_json_file(out_dir / "config.json")
    return out_dir


def make_synthetic_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 16,
    alpha: float = 32,
    target_modules: Sequence[str] = LLAMA_PROJECTIONS,
    rank_pattern: Mapping[str, int] | None = None,
    use_rslora: bool = False,
    dtype: str = "float32",
    scale: float = 0.02,
    seed: int = 1,
) -> Path:
    """Write a PEFT LoRA adapter of random factors for a model written by
    `make_synthetic_llama` (or any Llama-layout checkpoint), straight with safetensors.

    ``target_modules`` are suffixes of module names (``q_proj`` ...); ``rank_pattern`` keys
    are suffixes too. Both A and B are random, N(0, scale).

    Returns:
        ``out_dir``.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir = Path(base_dir)
    index_path = base_dir / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(base_dir / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    patterns = dict(rank_pattern or {})
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        suffix = module.rsplit(".", 1)[-1]
        if len(shape) != 2 or suffix not in target_modules or not module.startswith("model.layers."):
            continue
        rank = patterns.get(suffix, r)
        out_features, in_features = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * scale).to(torch_dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * scale).to(torch_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
        "rank_pattern": patterns,
        "alpha_pattern": {},
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
