"""The sentence-transformers model run by torch: loading it offline, the forward pass that gives
both retrieval views, and int8 dynamic quantization.

Both `registry.search.embed.TorchEmbedder` and the ONNX export (`registry.search.onnx_export`)
use it, so the export needs nothing from the embedders. Importing this module is cheap; torch
and sentence-transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["intermediate_layer", "load_sentence_transformer", "quantized", "torch_encode"]


def intermediate_layer(num_hidden_layers: int) -> int:
    """The hidden layer whose mean-pooled states form the second view: 2/3 of the depth
    (layer 4 of MiniLM's 6)."""
    return max(1, round(num_hidden_layers * 2 / 3))


def torch_encode(model: Any, layer: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit sentence vectors and unit mean-pooled vectors of hidden ``layer`` of ``texts``,
    from a sentence-transformers model (see `load_sentence_transformer`)."""
    import torch

    features = model.preprocess(texts)
    with torch.inference_mode():
        out = model(features)
    hidden = out["all_layer_embeddings"][layer]
    mask = out["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (
        torch.nn.functional.normalize(out["sentence_embedding"], dim=1).numpy(),
        torch.nn.functional.normalize(pooled, dim=1).numpy(),
    )


def load_sentence_transformer(path: Path) -> Any:
    """The sentence-transformers model at ``path``, offline, with hidden states kept."""
    from composer import TRANSFORMERS_LOCK

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with TRANSFORMERS_LOCK:  # the warm-up may load this while a composition plans its base
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    transformer: Any = model[0]
    transformer.auto_model.config.output_hidden_states = True
    return model


def quantized(model: Any) -> Any:
    """The model with int8 weights in its linear layers (per output channel) and int8
    matrix products: about 2.5x faster on a CPU for a one-sentence query, at a cosine of
    about 0.98 to the float32 embedding. Vectors of the two are not comparable, which is
    why the model identity records the quantization."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that eager quantization moves to torchao
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
