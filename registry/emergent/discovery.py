"""The work of a discovery job, free of databases and HTTP: base model directory and probe
texts in, neuron sets with their verification table out.

The base is loaded with transformers in float32 on CPU and the probes are tokenized with the
base's own tokenizer (truncated to ``max_tokens``, padded per batch and masked). Each
function's texts are split once, seeded: the held-out part is only used by verification, so
the table measures neurons on texts they were not chosen on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Discovery", "FunctionProbe", "discover", "probe_hash", "split_held_out"]

_BATCH_TEXTS = 8


@dataclass(frozen=True)
class FunctionProbe:
    """One function's name and texts."""

    name: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Discovery:
    """What a discovery found: each function's neuron set (``layer -> int64 indices``),
    the parameters used (defaults filled in), the verification table (JSON-ready) and the
    statistics' sizes."""

    neuron_sets: dict[str, Any]
    params: dict[str, Any]
    verification: dict[str, Any]
    statistics: dict[str, Any]


def probe_hash(texts: Sequence[str]) -> str:
    """sha256 of a probe set's texts (canonical JSON), recorded with the brick."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()


def split_held_out(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(selection texts, held-out texts)``: a seeded shuffle, at least one text on each side.

    Args:
        texts: at least two texts.
        fraction: share of texts held out, in (0, 1).
        seed: shuffle seed.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = min(len(texts) - 1, max(1, round(len(texts) * fraction)))
    return [texts[i] for i in order[held:]], [texts[i] for i in order[:held]]


def _batches(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[tuple[Any, Any]]:
    batches = []
    for start in range(0, len(texts), _BATCH_TEXTS):
        encoded = tokenizer(
            list(texts[start : start + _BATCH_TEXTS]),
            truncation=True,
            max_length=max_tokens,
            padding=True,
            return_tensors="pt",
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"].bool()))
    return batches


def discover(
    base_path: Path,
    probes: Sequence[FunctionProbe],
    *,
    method: str,
    params: dict[str, Any],
    held_out: float,
    max_tokens: int,
    seed: int,
    progress: Callable[[float, str], None],
) -> Discovery:
    """Collect statistics on each function's selection texts, select, and verify on the rest.

    Args:
        base_path: a Hugging Face model directory with a tokenizer.
        probes: the functions, in order.
        method, params: a `composer.emergent.SELECTION_METHODS` entry and its parameters.
        held_out, seed: the split (`split_held_out`); ``seed`` also draws the random sets.
        max_tokens: truncation length.
        progress: ``progress(fraction, message)``; raising from it stops the job.

    Raises:
        composer.ComposeError subclasses: no FFN layers, probe sets without tokens, bad params.
        OSError / ValueError: the model or its tokenizer cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer import TRANSFORMERS_LOCK, collect_statistics, select_neurons, verify_neuron_sets

    progress(0.02, "loading the base model")
    with TRANSFORMERS_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    if tokenizer.pad_token is None:
        # Padding positions are masked out of statistics and losses: any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    splits = {p.name: split_held_out(p.texts, held_out, seed) for p in probes}
    selection = {name: _batches(tokenizer, fit, max_tokens) for name, (fit, _) in splits.items()}
    verification = {name: _batches(tokenizer, held, max_tokens) for name, (_, held) in splits.items()}
    total_batches = max(1, sum(len(b) for b in selection.values()))
    seen = [0]

    def counted(name: str, tokens: int) -> None:
        seen[0] += 1
        progress(0.05 + 0.55 * seen[0] / total_batches, f"statistics: {name} ({tokens} tokens so far)")

    stats = collect_statistics(model, selection, per_text=method == "average_precision", progress=counted)
    progress(0.62, f"selecting neurons ({method})")
    sets, used = select_neurons(stats, method, params)
    ablations = 2 * len(sets)
    done = [0]

    def measured(name: str) -> None:
        done[0] += 1
        progress(0.65 + 0.3 * done[0] / ablations, f"verifying: ablating {name}")

    table = verify_neuron_sets(model, verification, sets, seed=seed, progress=measured)
    statistics = {
        "tokens": dict(zip(stats.functions, (int(t) for t in stats.tokens.tolist()), strict=True)),
        "texts": {name: {"selection": len(fit), "held_out": len(held)} for name, (fit, held) in splits.items()},
        "layers": len(stats.layers),
        "width": stats.width,
        "bytes": stats.nbytes(),
    }
    return Discovery(neuron_sets=sets, params=used, verification=table.to_dict(), statistics=statistics)
